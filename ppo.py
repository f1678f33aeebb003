# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch==2.13.0",
#     "transformers==5.23.0",
#     "datasets==5.2.0",
#     "tyro==1.0.17",
# ]
# ///
"""RLHF with PPO, the Tulu 2.5 recipe (Ivison et al., 2024, Appendix F.2 / E.2, Tables 9 and 10).

Four models: the policy pi_theta (initialised from SFT), the frozen reference pi_ref (SFT), the frozen
reward model R_psi, and a value model V_phi initialised from the reward model: the same scalar head,
applied at every response position. Each iteration:

  1. rollout: sample a response for each prompt (temperature 0.7, KV cache), cut after the first EOS;
  2. score:   r = R_psi(x, y); the EOS trick: a response with no EOS gets a fixed penalty (-10);
  3. rewards: r_t = -beta (log pi_theta(y_t|.) - log pi_ref(y_t|.)), plus r at the last token  (Eq. 4);
  4. GAE:     A_t from r_t and V_phi (gamma 1, lambda 0.95), whitened within the batch;
  5. update:  L = L_pi + alpha L_V with the clipped PPO losses                             (Eq. 5, 6)
                L_pi = -E_t min(nu_t A_t, clip(nu_t, 1 - eps, 1 + eps) A_t),  nu_t = pi_theta / pi_old
                L_V  = E_t 1/2 max((V - G_t)^2, (clip(V, V_old - eps, V_old + eps) - G_t)^2)

Eq. 5 prints pi_ref in the ratio's denominator; standard PPO (and this file) divides by pi_old, the
policy that sampled the rollout. Steps 2-4 run per optimiser step with the current models (App. G;
CleanRL runs them once per batch), so every step's first ratio is exactly 1. A step takes Table 9's
b x g episodes in g forward-backward passes of b, its loss one token mean over them all (Table 11's
B = 512, r = 2, b = 64, g = 2 is `--batch_size 512 --num_rollouts_per_prompt 2 --minibatch_size 64
--gradient_accumulation_steps 2`). Fixed beta, no reward normalisation, whitened advantages (Table 10).
Real checkpoints: the rollout samples exactly softmax(logits / T), the distribution whose log-probs the
ratio and the KL use; a response ends at its first stop id, the score is read there, and dropout is off.

Many GPUs (`torchrun`, docs/many-gpus.md): each process rolls out, scores and updates on --batch_size
prompts of its own; the advantages are whitened over all processes and FSDP averages the gradients.
Rollouts run `model.generate` on the sharded policy: fine for a small model, slow for a 7B one (whose
rollouts belong in a serving engine such as vLLM: not built here).

    python ppo.py                                          # the toy: toy/sft aligned against toy/rm
    python ppo.py --model my-sft --reward_model my-rm --prompts my-prompts --learning_rate 1e-6
    torchrun --nproc_per_node 4 ppo.py --batch_size 16 --minibatch_size 16 ...   # 4 GPUs, 64 prompts
"""

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro
from tqdm import tqdm


@dataclass
class Args:
    """PPO: align an SFT policy against a frozen reward model, then sample held-out prompts and score them.

    Example: python ppo.py --model my-sft --reward_model my-rm --prompts my-prompts.jsonl"""

    # data
    prompts: str = "toy/data/prompts"
    """prompt dataset (column `prompt`): hub name, directory of {split}.jsonl files, or a .jsonl file"""
    train_split: str = "train"
    """split whose prompts the policy is trained on"""
    eval_split: Optional[str] = "test"
    """split for the end-of-run samples (None: skip)"""
    num_eval_prompts: Optional[int] = 256
    """sample one response for each of the first N eval prompts (None: all)"""
    max_prompt_length: int = 1024
    """prompts longer than this many tokens, as the model sees them, are dropped and counted (L_p)"""

    # models
    model: str = "toy/sft"
    """hub id or local directory of the SFT policy to start from"""
    ref: Optional[str] = None
    """reference model (default: the starting policy)"""
    reward_model: str = "toy/rm"
    """frozen reward model (AutoModelForSequenceClassification, one output)"""
    value_model: Optional[str] = None
    """value model's initialisation (default: the reward model, as in the paper)"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% slower"""
    dropout: bool = False
    """keep the policy's and value model's dropout in the update (the old log-probs: eval mode always)"""

    # rollouts (Table 9)
    total_episodes: int = 6144
    """responses to train on in all (the paper: one epoch over its prompts; the toy: 8 epochs)"""
    batch_size: int = 64
    """prompts per rollout batch (B; per process under torchrun)"""
    num_rollouts_per_prompt: int = 1
    """responses sampled per prompt (r); a batch holds B * r episodes"""
    minibatch_size: int = 64
    """episodes per forward-backward pass (b; per process under torchrun)"""
    gradient_accumulation_steps: int = 1
    """minibatches per optimiser step (g): a step whitens and takes one token mean over b x g episodes"""
    max_new_tokens: int = 64
    """response length limit (L_c); a response that reaches it without EOS gets the EOS penalty"""
    temperature: float = 0.7
    """sampling temperature of the rollouts (tau)"""

    # RL (Table 9)
    beta: float = 0.05
    """fixed KL penalty coefficient (0: no KL penalty; the policy may drift from pi_ref freely)"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    clip: float = 0.2
    """clipping range of the policy and value losses (epsilon)"""
    vf_coef: float = 0.1
    """value loss coefficient (alpha)"""
    ppo_epochs: int = 1
    """inner epochs (e): passes, one optimiser step each, over a step's b x g episodes (App. G; Table 9's
    pass over the whole batch when one step takes it all: b x g = B r, the default)"""
    missing_eos_penalty: float = -10.0
    """score of a response with no EOS (the EOS trick)"""

    # optimisation (Table 9: AdamW (0.9, 0.95), eps 1e-5, no weight decay, clip 1.0, 10% warmup)
    learning_rate: float = 1e-4
    """learning rate after warmup (1e-4 suits the toy; the paper: 1e-6)"""
    warmup_ratio: float = 0.1
    """fraction of the optimiser steps with linear warmup; constant afterwards"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    adam_eps: float = 1e-5
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm (policy and value together) to this"""

    # evaluation, logging and output
    eval_temperature: Optional[float] = None
    """temperature of the end-of-run samples (None: the rollout's, the sampler PPO trained; 1.0: as others)"""
    output_dir: Optional[str] = None
    """where the run goes (default: runs/ppo-<time>); must be empty (or --resume)"""
    log_every: int = 10
    """iterations between log lines"""
    save_every: int = 0
    """iterations between checkpoints (the last one kept) that --resume continues from (0: none)"""
    resume: bool = False
    """continue the unfinished run in --output_dir from its last checkpoint (same arguments)"""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """also send the logged records to a tracker (its package installed: pip install tensorboard, ...)"""
    run_name: Optional[str] = None
    """the run's name in wandb or trackio (default: the output dir's name; TensorBoard uses the folder's)"""
    dry_run: bool = False
    """print one formatted, tokenised prompt and the counts, then stop before loading or writing anything"""

    # setup
    seed: int = 0
    """seed of the prompt order and the sampling"""
    device: str = "auto"
    """cuda, cpu, ... (auto: cuda when available)"""
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    """compute dtype: bfloat16 autocasts the forward pass (weights stay fp32); default bf16 on CUDA"""


def check_args(args: Args) -> None:
    """Every argument checked before anything is loaded or written: one line each."""
    episodes_per_batch = args.batch_size * args.num_rollouts_per_prompt
    step_size = args.minibatch_size * args.gradient_accumulation_steps
    counts = ["max_prompt_length", "max_new_tokens", "batch_size", "num_rollouts_per_prompt",
              "minibatch_size", "gradient_accumulation_steps", "ppo_epochs", "log_every"]
    problems = [(getattr(args, name) < 1, f"--{name} must be at least 1 (got {getattr(args, name)})")
                for name in counts]
    problems += [
        (args.beta < 0, f"--beta must be 0 (no KL penalty) or more (got {args.beta}); below 0 the policy is "
                        "rewarded for moving away from the reference"),
        (args.temperature <= 0, f"--temperature must be positive (got {args.temperature}); PPO samples, and "
                                "its log-probs are taken from logits / temperature"),
        (args.eval_temperature is not None and args.eval_temperature <= 0,
         f"--eval_temperature must be positive (got {args.eval_temperature}); leave it unset for the "
         "rollout temperature"),
        (args.learning_rate <= 0, f"--learning_rate must be positive (got {args.learning_rate})"),
        (not 0 <= args.warmup_ratio < 1, f"--warmup_ratio must be in [0, 1) (got {args.warmup_ratio})"),
        (args.max_grad_norm <= 0, f"--max_grad_norm must be positive (got {args.max_grad_norm})"),
        (args.clip <= 0, f"--clip must be positive (got {args.clip}); it is the ratio's distance from 1"),
        (not 0 <= args.gamma <= 1, f"--gamma must be in [0, 1] (got {args.gamma})"),
        (not 0 <= args.lam <= 1, f"--lam must be in [0, 1] (got {args.lam})"),
        # WORLD_SIZE: set by torchrun; check_args runs before the processes join (world_size() is still 1)
        (args.total_episodes < episodes_per_batch * int(os.environ.get("WORLD_SIZE", 1)),
         f"--total_episodes ({args.total_episodes}) is less than one batch of --batch_size * "
         f"--num_rollouts_per_prompt ({episodes_per_batch}) episodes x processes: the run would have zero "
         "iterations"),
        (step_size != 0 and episodes_per_batch % step_size > 0,  # a step of 0 episodes: reported above
         f"--batch_size * --num_rollouts_per_prompt ({episodes_per_batch}) must be a multiple of "
         f"--minibatch_size x --gradient_accumulation_steps ({args.minibatch_size} x "
         f"{args.gradient_accumulation_steps}: the episodes of one optimiser step)"),
        (args.save_every < 0, f"--save_every must be 0 (no checkpoints) or more (got {args.save_every})"),
        (args.resume and not args.output_dir, "--resume needs the --output_dir of the run to continue"),
        (args.report_to != "none" and not importlib.util.find_spec(args.report_to),
         f"--report_to {args.report_to} needs its package, not installed here: pip install {args.report_to}"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


# ---- The method's maths ---------------------------------------------------------------------------
# Shapes: (B, R) over the response tokens; `mask` is 1 up to and including EOS.


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked positions; masked-out positions become 0. Under torchrun the
    mean and the variance are those of every process's episodes together (all_sum)."""
    total, count = all_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = total / count.clamp(min=1)
    var = all_sum(((x - mean) ** 2 * mask).sum()) / count.clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def eos_trick(scores: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """The EOS trick (Table 10): a response that never produced a stop token scores exactly `penalty`
    (-10) in place of the reward model's score; a finished one keeps its score. scores, finished: (B,)."""
    return torch.where(finished, scores, torch.full_like(scores, penalty))


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Token-level rewards of Eq. 4: -beta (log pi - log pi_ref) at every response token, plus the
    sequence score at the last one (the EOS, or the last token of a truncated response).
    scores: (B,); logprobs, ref_logprobs, mask: (B, R). Returns (B, R), 0 after the last token."""
    rewards = -beta * (logprobs - ref_logprobs) * mask  # k1 KL estimate per token
    last = mask.sum(1).long() - 1  # index of each response's last real token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple:
    """Generalised advantage estimation over each response, backwards in time; the value after the
    last token is 0 (the episode ends). Returns (advantages, returns), each (B, R), 0 outside mask."""
    R = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < R else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float) -> tuple:
    """Clipped surrogate (Eq. 5 with footnote 16), the ratio taken to the rollout policy.
    Returns (loss, clipfrac): the fraction of tokens where the clipped branch is taken."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip: float) -> tuple:
    """Clipped value loss: Eq. 6's 1/2 (V - G_t)^2, with V kept within clip of the rollout's values:
    1/2 max((V - G)^2, (clip(V, V_old - clip, V_old + clip) - G)^2), a mean over the response tokens
    (mask). values, old_values, returns, mask: (B, R). Returns (loss, clipfrac): clipfrac is the
    fraction of response tokens where the clipped value's squared error is the larger (the max takes
    the clipped branch)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


# ---- Models: rollouts, per-token log-probs and values ---------------------------------------------


def disable_dropout(model) -> None:
    """Dropout off, including the attention rates kept as plain floats (Llama's, Qwen2's): with it the
    policy in train mode is not the model whose log-probs the reference or the rollout recorded."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


@torch.no_grad()
def rollout(policy, tokenizer, prompts: list, args, device, stop_ids: list) -> dict:
    """Step 1: one response per prompt, KV-cached, sampled from exactly softmax(logits / T) (no sampling
    setting of the checkpoint's leaks in), cut after its first stop id. Returns query (B, Q) left-padded,
    response (B, R) with its mask (1 up to and including the stop token, padding after), finished (B,)."""
    tokenizer.padding_side = "left"
    batch = tokenizer([format_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=not isinstance(prompts[0], list)).to(device)
    policy.eval()
    response = generate(policy, batch, args.temperature, args.max_new_tokens, tokenizer.pad_token_id,
                        stop_ids)[:, batch["input_ids"].shape[1] :]
    is_stop = torch.isin(response, torch.tensor(stop_ids, device=response.device))
    after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0  # strictly after the first stop token
    return {"query": batch["input_ids"], "query_mask": batch["attention_mask"],
            "response": response.masked_fill(after_stop, tokenizer.pad_token_id),
            "mask": (~after_stop).long(), "finished": is_stop.any(1)}


def full_inputs(mb: dict) -> dict:
    """Query + response as one left-and-right-padded batch, with positions counted from the first
    real token (left padding must not shift them)."""
    mask = torch.cat([mb["query_mask"], mb["mask"]], 1)
    return {"input_ids": torch.cat([mb["query"], mb["response"]], 1), "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def policy_logprobs(model, mb: dict, temperature: float, autocast, entropy: bool = False) -> tuple:
    """log pi(y_t | x, y_<t) of every response token from logits / temperature, in fp32, and (when asked)
    the entropy of that distribution; (B, R) each, or None. The LM head runs at the response positions
    only, and gather minus logsumexp over chunks of positions holds no fp32 (B, R, V) log-softmax."""
    R = mb["response"].shape[1]
    with autocast:  # position Q-1+t predicts token t: the last R + 1 positions, minus the very last
        logits = model(**full_inputs(mb), logits_to_keep=R + 1).logits[:, :-1]
    token_logprobs, entropies = [], []
    for t in range(0, R, 128):
        part = logits[:, t : t + 128].float() / temperature
        logsumexp = part.logsumexp(-1)
        token_logprobs.append(part.gather(-1, mb["response"][:, t : t + 128, None]).squeeze(-1) - logsumexp)
        if entropy:
            with torch.no_grad():  # for the logs only
                entropies.append(logsumexp - (part.softmax(-1) * part).sum(-1))
    return torch.cat(token_logprobs, 1), torch.cat(entropies, 1) if entropy else None


def values_and_scores(model, mb: dict, autocast) -> tuple:
    """A sequence-classification model's score head at every position, in fp32: V(x, y_<t) for each
    response token t (read at position Q-1+t), and at each response's last real token, Q - 1 + its length
    (the stop token, or a cut response's last), the reward model's score. Returns (B, R) and (B,)."""
    Q = mb["query"].shape[1]
    with autocast:
        hidden = getattr(model, model.base_model_prefix)(**full_inputs(mb)).last_hidden_state
        out = model.score(hidden).squeeze(-1).float()  # (B, Q + R)
    return out[:, Q - 1 : -1], out[torch.arange(len(out)), Q - 1 + mb["mask"].sum(1)]


def take(batch: dict, index) -> dict:
    return {k: v[index] for k, v in batch.items()}


# ---- Training -------------------------------------------------------------------------------------


def load_models(args, device) -> tuple:
    """The policy and the value model (trained; dropout off unless --dropout), the reference and the
    reward model (frozen). A --value_model may be a causal LM, its head then random (the paper: V from R)."""
    policy = place(load_model(args.model, args.trust_remote_code), device)
    ref_model = place(load_model(args.ref or args.model, args.trust_remote_code), device, frozen=True)
    reward_model = place(load_model(args.reward_model, args.trust_remote_code, scalar=True), device,
                         frozen=True)
    value_model = load_model(args.value_model or args.reward_model, args.trust_remote_code, scalar=True,
                             new_head=args.value_model is not None)
    value_model = place(value_model, device)
    if not args.dropout:
        disable_dropout(policy), disable_dropout(value_model)
    return policy, ref_model, reward_model, value_model


@torch.no_grad()
def rollout_forwards(policy, ref_model, reward_model, value_model, mb: dict, args, autocast) -> tuple:
    """Steps 2-4's forwards over a step's episodes in eval mode, b at a time (the update's shapes, so the
    first ratio is exactly 1): the scores (B,); the policy's and pi_ref's log-probs, the values (B, R)."""
    policy.eval(), value_model.eval()
    parts = []
    for a in range(0, len(mb["mask"]), args.minibatch_size):
        part = take(mb, slice(a, a + args.minibatch_size))
        _, scores = values_and_scores(reward_model, part, autocast)
        old_logprobs, _ = policy_logprobs(policy, part, args.temperature, autocast)
        ref_logprobs, _ = policy_logprobs(ref_model, part, args.temperature, autocast)
        old_values, _ = values_and_scores(value_model, part, autocast)
        parts.append((scores, old_logprobs, ref_logprobs, old_values))
    policy.train(), value_model.train()
    return tuple(torch.cat(x) for x in zip(*parts))


def ppo_update(policy, value_model, mb: dict, old: dict, args, autocast, stats: dict) -> float:
    """One epoch of step 5 on a step's b x g episodes (the caller steps): L_pi + alpha L_V (Eq. 5, 6) in g
    forward-backward passes of b, each weighted by its share of the tokens: one token mean over the step,
    whatever g. Appends each pass's stats; returns their summed losses, for the step's finiteness check."""
    n_tokens, losses = all_sum(old["mask"].sum()) / world_size(), 0.0  # FSDP averages: the global mean
    for a in range(0, len(old["mask"]), args.minibatch_size):
        sl = slice(a, a + args.minibatch_size)
        mask = old["mask"][sl]
        logprobs, entropy = policy_logprobs(policy, take(mb, sl), args.temperature, autocast, entropy=True)
        values, _ = values_and_scores(value_model, take(mb, sl), autocast)
        # the ratio to the rollout policy (the old log-probs), not to pi_ref as Eq. 5 prints
        pg_loss, clipfrac = ppo_policy_loss(logprobs, old["logprobs"][sl], old["advantages"][sl], mask,
                                            args.clip)
        vf_loss, vf_clipfrac = ppo_value_loss(values, old["values"][sl], old["returns"][sl], mask, args.clip)
        ((pg_loss + args.vf_coef * vf_loss) * (mask.sum() / n_tokens)).backward()  # its share of the tokens
        with torch.no_grad():
            approx_kl = masked_mean(0.5 * (logprobs - old["logprobs"][sl]) ** 2, mask)
        append(stats, {"ppo/policy_loss": pg_loss, "ppo/value_loss": vf_loss, "ppo/clipfrac": clipfrac,
                       "ppo/vf_clipfrac": vf_clipfrac, "ppo/approx_kl": approx_kl,
                       "ppo/entropy": masked_mean(entropy, mask)})
        losses += pg_loss.item() + vf_loss.item()
    return losses


@torch.no_grad()
def evaluate(policy, ref_model, reward_model, tokenizer, prompts: list, args, device, autocast,
             stop_ids: list, path: Path) -> dict:
    """The end-of-run samples, by `rollout` at --eval_temperature with a fixed seed, written to `path`:
    each one's raw reward-model score (no EOS penalty) and log pi_T(y|x) - log pi_ref,T(y|x) summed over
    its tokens, whose mean estimates KL(pi_T || pi_ref,T). Returns the metrics."""
    args = dataclasses.replace(args, temperature=args.eval_temperature or args.temperature)
    rows, batch_size = [], 4 * args.batch_size
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            with autocast:  # the training's sampler, in its precision
                batch = rollout(policy, tokenizer, chunk, args, device, stop_ids)
            _, scores = values_and_scores(reward_model, batch, autocast)
            logprobs, _ = policy_logprobs(policy, batch, args.temperature, autocast)
            ref_logprobs, _ = policy_logprobs(ref_model, batch, args.temperature, autocast)
            logratios = ((logprobs - ref_logprobs) * batch["mask"]).sum(1)
            for j, prompt in enumerate(chunk):
                n = batch["mask"][j].sum().item()
                response = tokenizer.decode(batch["response"][j, :n], skip_special_tokens=True)
                rows.append({"prompt": prompt, "score": scores[j].item(), "logratio": logratios[j].item(),
                             "length": n, "finished": batch["finished"][j].item(), "response": response})
    write_jsonl(path, rows)
    n, scores = len(rows), torch.tensor([r["score"] for r in rows])
    return {"eval/score": scores.mean().item(), "eval/score_se": (scores.std() / math.sqrt(n)).item(),
            **{f"eval/{k}": sum(r[key] for r in rows) / n
               for k, key in (("kl", "logratio"), ("length", "length"), ("eos_rate", "finished"))}}


def dry_run(tokenizer, train_prompts: list, eval_prompts: list, num_iterations: int, total_steps: int,
            args) -> dict:
    """--dry_run: the first prompt as the policy sees it, and the counts, before any model loads."""
    first_prompt, episodes = train_prompts[0], args.batch_size * args.num_rollouts_per_prompt
    ids = tokenizer(format_prompt(tokenizer, first_prompt),
                    add_special_tokens=not isinstance(first_prompt, list))["input_ids"]  # as rollout() does
    print(f"prompt: {tokenizer.decode(ids)!r}  ({len(ids)} tokens; the response follows)")
    print(f"dry run: {len(train_prompts)} train / {len(eval_prompts)} eval prompts, {num_iterations} "
          f"iterations of {episodes} episodes, {total_steps} optimiser steps of "
          f"{args.gradient_accumulation_steps} x {args.minibatch_size} episodes; nothing loaded or written")
    return {"train/prompts": len(train_prompts), "eval/prompts": len(eval_prompts), "train/iterations":
            num_iterations, "train/episodes_per_batch": episodes, "train/steps": total_steps}


def main(args: Args) -> dict:
    # set-up: every argument, the output dir and every tokenizer checked before any model loads
    check_args(args)
    device, dtype, autocast = setup(args)
    others = [args.ref or args.model, args.reward_model, args.value_model or args.reward_model]
    out = None if args.dry_run else check_output_dir(args, "ppo", [args.model, *others], reshard=False)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    stop_ids = stop_token_ids(tokenizer, args.model)
    check_tokenizers(tokenizer, args.model, others, args.trust_remote_code)
    train_prompts = drop_long_prompts(load_split(args.prompts, args.train_split, [("prompt",)])["prompt"],
                                      tokenizer, args.max_prompt_length, "train prompts")
    eval_prompts = []
    if args.eval_split:
        eval_prompts = load_split(args.prompts, args.eval_split, [("prompt",)], args.num_eval_prompts)
        eval_prompts = eval_prompts["prompt"]
    if eval_prompts:
        eval_prompts = drop_long_prompts(eval_prompts, tokenizer, args.max_prompt_length, "eval prompts")
    if len(train_prompts) < args.batch_size * world_size():  # the prompt stream would yield no batch
        raise SystemExit(f"error: {len(train_prompts)} train prompts in '{args.prompts}' are fewer than one "
                         f"batch of --batch_size {args.batch_size} x {world_size()} process(es): lower "
                         "--batch_size, or give more prompts")
    episodes_per_batch = args.batch_size * args.num_rollouts_per_prompt  # per process under torchrun
    num_iterations = args.total_episodes // (episodes_per_batch * world_size())
    step_size = args.minibatch_size * args.gradient_accumulation_steps  # episodes per optimiser step: b x g
    total_steps = num_iterations * (episodes_per_batch // step_size) * args.ppo_epochs
    if args.dry_run:
        return dry_run(tokenizer, train_prompts, eval_prompts, num_iterations, total_steps, args)

    policy, ref_model, reward_model, value_model = load_models(args, device)
    optimizer, scheduler = start_training([policy, value_model], args, total_steps, "constant",
                                          eps=args.adam_eps)  # Table 9: constant after warmup
    start_iteration, progress = 0, {"rollout": 0.0, "update": 0.0, "window": {}}
    if args.resume and last_checkpoint(out):  # models, optimiser, schedule, prompt stream, random states
        start_iteration, progress = restore(last_checkpoint(out), [policy, value_model], optimizer, scheduler)
    create_output_dir(out, args, device, dtype, resume_step=start_iteration if args.resume else None)
    tracker = Tracker(args, out, start_iteration)
    print(f"ppo: {len(train_prompts)} train prompts, {num_iterations} iterations of {episodes_per_batch} "
          f"episodes x {world_size()} process(es), {total_steps} optimiser steps of {step_size} episodes, "
          f"beta {args.beta}, device {device}, {dtype}")

    stream = prompt_stream(train_prompts, args.batch_size, args.seed, skip=start_iteration)
    window = progress["window"]
    iterations = range(start_iteration + 1, num_iterations + 1)
    for iteration in tqdm(iterations, desc="ppo", disable=rank() > 0 or None):
        # 1. rollout: one response per prompt, sampled at --temperature and cut after its first stop id
        start = time.time()
        prompts = [p for p in next(stream) for _ in range(args.num_rollouts_per_prompt)]
        with autocast:  # sampled in the precision the old log-probs and the KL are taken in
            batch = rollout(policy, tokenizer, prompts, args, device, stop_ids)
        progress["rollout"] += time.time() - start
        start, stats = time.time(), {}
        order = torch.randperm(episodes_per_batch, device=device)
        for offset in range(0, episodes_per_batch, step_size):  # one optimiser step's b x g episodes
            mb = take(batch, order[offset : offset + step_size])
            mask = mb["mask"].float()
            # 2. score with the current models (App. G: per optimiser step), with the EOS trick
            scores, old_logprobs, ref_logprobs, old_values = rollout_forwards(
                policy, ref_model, reward_model, value_model, mb, args, autocast)
            scores = eos_trick(scores, mb["finished"], args.missing_eos_penalty)
            # 3. KL-penalised token rewards (Eq. 4): fixed beta, no reward normalisation or whitening
            rewards = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, args.beta)
            # 4. GAE (gamma 1, lambda 0.95), then the advantages whitened over the step's episodes
            advantages, returns = compute_gae(rewards, old_values * mask, mask, args.gamma, args.lam)
            old = {"logprobs": old_logprobs, "values": old_values, "returns": returns, "mask": mask,
                   "advantages": masked_whiten(advantages, mask)}
            kl = ((old_logprobs - ref_logprobs) * mask).sum(1)
            append(stats, {"objective/score": scores.mean(), "objective/kl": kl.mean(),
                           "objective/non_score_reward": (-args.beta * kl).mean(),
                           "val/eos_rate": mb["finished"].float().mean(), "val/length": mask.sum(1).mean()})
            # 5. clipped updates (Eq. 5, 6), --ppo_epochs passes over the step's episodes
            for _ in range(args.ppo_epochs):
                loss = ppo_update(policy, value_model, mb, old, args, autocast, stats)
                grad_norm = optimizer_step(optimizer, scheduler, args.max_grad_norm, loss,
                                           f"at iteration {iteration}")
                append(stats, {"train/grad_norm": grad_norm})
        progress["update"] += time.time() - start
        tally(window, {key: sum(v) / len(v) for key, v in stats.items()}, 1)

        if iteration % args.log_every == 0 or iteration == num_iterations:
            elapsed = max(progress["rollout"] + progress["update"], 1e-9)
            log(out, {"iteration": iteration, "episodes": iteration * episodes_per_batch * world_size(),
                      **means(window),
                      "train/lr": scheduler.get_last_lr()[0],
                      "perf/episodes_per_s": iteration * episodes_per_batch / elapsed,
                      "perf/rollout_fraction": progress["rollout"] / elapsed}, tracker)
        if args.save_every and iteration % args.save_every == 0 and iteration < num_iterations:
            save_checkpoint([policy, value_model], optimizer, scheduler, out, iteration, progress)
    save_model(policy, tokenizer, out)

    elapsed = progress["rollout"] + progress["update"]
    results = {"train/iterations": num_iterations, "train/runtime_s": round(elapsed, 1),
               "perf/rollout_s": round(progress["rollout"], 1), "perf/update_s": round(progress["update"], 1),
               "perf/episodes_per_s": round(num_iterations * episodes_per_batch / max(elapsed, 1e-9), 2)}
    if eval_prompts:
        results.update(evaluate(policy, ref_model, reward_model, tokenizer, eval_prompts, args, device,
                                autocast, stop_ids, out / "samples.jsonl"))
    return finish(out, results, tracker)


# ---- Plumbing --------------------------------------------------------------------------------------
# The same text in every script that uses it (tests/test_twins.py): arguments, data files, tokenizers,
# loading models, many processes, the run's folder, logs and checkpoints. Safe to skip on a first reading.


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup from 0, then linear or cosine decay to `floor`, or constant."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


def prompt_stream(prompts: list, batch_size: int, seed: int, skip: int):
    """Endless shuffled batches of prompts (an epoch's remainder dropped), after `skip` done ones; under
    torchrun a part each."""
    me, world, g, n = rank(), world_size(), torch.Generator().manual_seed(seed), 0
    while True:
        order = torch.randperm(len(prompts), generator=g).tolist()
        for i in range(0, len(order) - batch_size * world + 1, batch_size * world):
            n += 1
            if n > skip:
                yield [prompts[j] for j in order[i + me * batch_size : i + (me + 1) * batch_size]]


def locate(name: str, what: str = "model") -> str:
    """The path `name` names (`~` expanded; if missing here, next to this script: the toy), or `name` as a
    hub id; a missing path fails now, not at the hub."""
    path = os.path.expanduser(name)
    for candidate in (Path(path), Path(__file__).resolve().parent / path):
        if candidate.exists():
            return str(candidate)
    if (name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".json", ".jsonl"))
            or (name.count("/") == 1 and Path(name.split("/")[0]).is_dir())):
        raise SystemExit(f"error: {what} '{name}' not found: no such file or directory")
    return path


def load_split(name: str, split: str, needs: list, n: Optional[int] = None):
    """The first n rows (None: all) of a split of a hub dataset, a folder of {split}.jsonl files or one .jsonl
    file (its one split is `train`: slice it, train[:95%] / train[95%:]), with the columns of one of needs."""
    from datasets import load_dataset

    path = locate(name, "dataset")
    one_file = path.endswith((".json", ".jsonl"))
    data = load_dataset("json", data_files=path, split=split) if one_file else load_dataset(path, split=split)
    if not any(set(columns) <= set(data.column_names) for columns in needs):
        wanted = " or ".join("+".join(columns) for columns in needs)
        raise SystemExit(f"error: split '{split}' of dataset '{name}' has columns {data.column_names}; "
                         f"it needs {wanted}")
    return data.select(range(min(n, len(data)))) if n else data


def drop_long_prompts(prompts: list, tokenizer, max_prompt_length: int, where: str) -> list:
    """The prompts of at most max_prompt_length tokens (Table 9's L_p); the others dropped, and counted."""
    lengths = [len(tokenizer(format_prompt(tokenizer, p), add_special_tokens=isinstance(p, str))["input_ids"])
               for p in prompts]
    kept = [p for p, n in zip(prompts, lengths) if n <= max_prompt_length]
    if len(kept) < len(prompts):
        print(f"note: {where}: dropped {len(prompts) - len(kept)} of {len(prompts)} prompts longer than "
              f"--max_prompt_length {max_prompt_length} tokens")
    if not kept:
        raise SystemExit(f"error: {where}: every prompt is longer than --max_prompt_length "
                         f"{max_prompt_length} tokens; raise it")
    return kept


def load_tokenizer(name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(locate(name), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        print(f"note: the tokenizer of '{name}' has no pad token; padding with EOS (masked everywhere)")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizers(tokenizer, own_name: str, names: list, trust_remote_code: bool) -> None:
    """Models that exchange token ids must share vocabulary and chat template, or scores are noise."""
    for name in dict.fromkeys(names):
        if Path(locate(name)).resolve() == Path(locate(own_name)).resolve():
            continue
        other = load_tokenizer(name, trust_remote_code)
        if other.get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"error: '{name}' has a different vocabulary than the policy ({len(other)} vs "
                             f"{len(tokenizer)} tokens); use models with the same tokenizer")
        if other.chat_template != tokenizer.chat_template:
            raise SystemExit(f"error: '{name}' has a different chat template than the policy; "
                             "it would read prompts and responses formatted differently from its training")


def stop_token_ids(tokenizer, name: str) -> list:
    """Every id that ends a response: the tokenizer's EOS and generation_config.json's eos_token_id(s)."""
    from transformers import GenerationConfig

    try:
        listed = GenerationConfig.from_pretrained(locate(name)).eos_token_id
    except OSError:  # no generation_config.json
        listed = None
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    return list(dict.fromkeys([tokenizer.eos_token_id, *listed]))


def format_prompt(tokenizer, prompt) -> str:
    """A message list through the chat template, ending in the generation prompt; a string as it is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def check_architecture(name: str, trust_remote_code: bool, wanted: str) -> None:
    """Refuses, before loading weights, a reward model where a causal LM is needed, or the converse."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(locate(name), trust_remote_code=trust_remote_code)
    found = config.architectures or []
    if found and not any(a.endswith(wanted) for a in found):
        kind = ("a causal LM (...ForCausalLM)" if wanted == "ForCausalLM"
                else "a reward model (...ForSequenceClassification)")
        raise SystemExit(f"error: '{name}' is a {'/'.join(found)} checkpoint; this needs {kind} here")


def load_model(name: str, trust_remote_code: bool, dtype=torch.float32, scalar: bool = False,
               new_head: bool = False):
    """A causal LM, or (`scalar`) a reward or value model with a trained score head (`new_head`: a random one
    allowed). Under torchrun rank 0 alone reads the weights; the others build on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if scalar else AutoModelForCausalLM
    extra = {"num_labels": 1} if scalar else {}
    if not new_head:
        check_architecture(name, trust_remote_code, "ForSequenceClassification" if scalar else "ForCausalLM")
    path = locate(name)
    if rank() > 0:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
        with torch.device("meta"):  # in rank 0's dtype, not the config's (bf16 for most hub models)
            return auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model, info = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                       output_loading_info=True, **extra)
    if info["missing_keys"] and not new_head:
        raise SystemExit(f"error: '{name}' lacks weights this needs ({sorted(info['missing_keys'])[:3]}); "
                         "is it the right checkpoint?")
    print(f"loaded '{name}': {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          "parameters")
    return model


def generate(model, batch: dict, temperature: float, max_new_tokens: int, pad_token_id: int, stop_ids: list):
    """model.generate (KV-cached): pure sampling from softmax(logits / T) until any stop id, with no top-k,
    top-p or penalty from the checkpoint's generation_config.json (set aside meanwhile)."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=stop_ids)
    checkpoint_config, model.generation_config = model.generation_config, config
    try:  # under FSDP every process runs forward passes until all have finished (synced_gpus)
        return model.generate(**batch, generation_config=config, synced_gpus=world_size() > 1)
    finally:
        model.generation_config = checkpoint_config


def setup(args) -> tuple:
    """Seed, device (joining torchrun's processes), dtype, quiet loading: (device, dtype, autocast)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", "torch.distributed is disabled")  # DCP in one process: as meant
    torch.manual_seed(args.seed)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if "LOCAL_RANK" in os.environ and not torch.distributed.is_initialized():  # under torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if rank() > 0:
            sys.stdout = open(os.devnull, "w")  # rank 0 alone prints
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return device, dtype, torch.autocast(device.type, dtype=torch.bfloat16, enabled=(dtype == "bfloat16"))


# ---- Many processes (torchrun, FSDP2; without torchrun none of this acts): each holds 1/N of every model,
# trains on its share of each global batch, runs every evaluation in full; rank 0 alone prints and writes.


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def place(model, device, frozen: bool = False):
    """The model on `device` (`frozen`: eval mode, no gradients); under torchrun sharded with FSDP2 (each
    decoder layer, then the rest), each process receiving its shards of rank 0's weights. The gathered
    weights stay fp32 under one process's autocast (FSDP's bf16 policy: SFT's first loss 1.2e-3 apart)."""
    if frozen:
        model.eval().requires_grad_(False)
    if world_size() == 1:
        return model.to(device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    weights = model.to(device).state_dict() if rank() == 0 else {}  # elsewhere the model is on "meta"
    # every unit reshards after its forward, the root too: optimiser and checkpoints see only shards
    units = [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]
    if hasattr(model, "score"):  # a scalar model: score() calls its backbone and head, not the whole
        units += [getattr(model, model.base_model_prefix), model.score]
    for unit in units + [model]:
        fully_shard(unit, reshard_after_forward=True)
    if rank() > 0:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    for buffer in model.buffers():  # not in a state dict (the rotary frequencies): rank 0's
        torch.distributed.broadcast(buffer, src=0)
    return model


def summed(numbers: list) -> list:
    """The numbers, each summed over the processes."""
    if world_size() == 1 or not numbers:
        return numbers
    nccl = torch.distributed.get_backend() == "nccl"
    total = torch.tensor(numbers, dtype=torch.float64, device="cuda" if nccl else "cpu")
    torch.distributed.all_reduce(total)
    return total.tolist()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """A tensor summed over the processes (x itself in one process): a statistic of the global batch."""
    if world_size() == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x)
    return x


def start_training(models: list, args, total_steps: int, schedule: str, floor: float = 0.0,
                   eps: float = 1e-8) -> tuple:
    """Train mode (gradient checkpointing if asked), one fused AdamW, warmup then `schedule`."""
    for model in models:
        model.train()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
    params = [p for model in models for p in model.parameters()]
    fused = params[0].device.type in ("cpu", "cuda")  # one kernel for all tensors
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=args.adam_betas, eps=eps,
                                  weight_decay=args.weight_decay, fused=fused)
    warmup = int(args.warmup_ratio * total_steps)
    if world_size() > 1:  # the models loaded alike; now each process draws its own samples, dropout masks
        torch.manual_seed(args.seed + rank())
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, schedule, floor))


def optimizer_step(optimizer, scheduler, max_grad_norm: float, loss: float, when: str) -> float:
    """Clips, steps and zeroes the gradients, or stops the run if the loss or gradient is not finite."""
    loss = summed([loss])[0]
    if not math.isfinite(loss):
        raise SystemExit(f"error: the loss became {loss} {when}; stopping before the update (the last "
                         "checkpoint, if any, is in --output_dir). Try a lower --learning_rate.")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # under FSDP a DTensor
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.item()
    if not math.isfinite(grad_norm):  # a finite loss, a non-finite gradient: an overflow
        raise SystemExit(f"error: the gradient norm became {grad_norm} {when} (the loss was finite); "
                         "stopping before the update. Try a lower --learning_rate or float32.")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def tally(window: dict, sums: dict, n: int) -> None:
    """Adds metric sums over n rows (or tokens) to a log window; `means` divides them at the log step."""
    for k, v in sums.items():
        window[k] = window.get(k, 0.0) + v
    window["n"] = window.get("n", 0) + n


def means(window: dict) -> dict:
    """The window's means (under torchrun over every process's rows); the window is emptied."""
    n = window.pop("n")
    *totals, n = summed(list(window.values()) + [n])
    result = {k: v / n for k, v in zip(window, totals)}
    window.clear()
    return result


def append(stats: dict, values: dict) -> None:
    """Appends each value (a float or a 0-d tensor) to its list in `stats`."""
    for k, v in values.items():
        stats.setdefault(k, []).append(v.item() if torch.is_tensor(v) else v)


def write_jsonl(path: Path, rows: list) -> None:
    if rank() > 0:  # rank 0 writes
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def log(out: Path, record: dict, tracker) -> None:
    """One record appended to out/metrics.jsonl, printed and sent to the --report_to tracker (floats averaged
    over the processes)."""
    floats = [k for k, v in record.items() if isinstance(v, float)]
    for k, total in zip(floats, summed([record[k] for k in floats])):
        record[k] = total / world_size()
    if rank() > 0:
        return
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    tracker.log(record)


class Tracker:
    """--report_to's run, on rank 0: the records of metrics.jsonl at their steps, eval.json as the summary.
    TensorBoard writes into the run's folder (`tensorboard --logdir runs/`); wandb and trackio share an API.
    --resume continues the run: TensorBoard from the checkpoint's step, wandb under its stored run id."""

    def __init__(self, args, out: Path, step: int):
        self.kind = args.report_to if rank() == 0 else "none"
        config = {**asdict(args), "output_dir": str(out)}
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.run = SummaryWriter(str(out), purge_step=step + 1 if step else 0)  # what followed: dropped
            self.run.add_text("args", json.dumps(config))
        elif self.kind != "none":
            self.run, run_id = importlib.import_module(self.kind), out / f"{self.kind}_run_id.txt"
            if self.kind == "wandb" and not run_id.exists():
                run_id.write_text(self.run.util.generate_id())
            resumed = {"id": run_id.read_text(), "dir": str(out)} if self.kind == "wandb" else {}
            self.run.init(project="minialign", name=args.run_name or out.name, config=config,
                          resume="allow" if args.resume else "never", **resumed)
            if self.kind == "wandb":  # plotted by the logged step: a resumed run relogs what followed
                self.run.define_metric("step")
                self.run.define_metric("*", step_metric="step", step_sync=True)

    def log(self, record: dict) -> None:
        step = record.get("step", record.get("iteration"))
        numbers = {k: v for k, v in record.items() if k not in ("step", "iteration")}
        if self.kind == "tensorboard":
            for k, v in numbers.items():
                self.run.add_scalar(k, v, step)
        elif self.kind == "wandb":
            self.run.log({"step": step, **numbers})
        elif self.kind == "trackio":
            self.run.log(numbers, step=step)

    def finish(self, results: dict) -> None:
        if self.kind == "tensorboard":
            self.run.add_text("eval", json.dumps(results))
            self.run.close()
        elif self.kind != "none":
            if self.kind == "wandb":
                self.run.run.summary.update(results)
            self.run.finish()


def check_output_dir(args, script: str, models: list, reshard: bool = True) -> Path:
    """Fails before any work if the run would overwrite another or, to --resume, is not the same run: the
    same arguments, on another number of processes only where `reshard` and the global batch is the same."""
    out = Path(args.output_dir or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.output_dir = str(out)
    if rank() > 0:  # only rank 0 checks (torchrun stops every process when one fails)
        return out
    if any(Path(locate(m)).resolve() == out.resolve() for m in models):
        raise SystemExit(f"error: output_dir '{out}' holds a model this run reads; choose another")
    if not args.resume:
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"error: output_dir '{out}' already holds a run; pass --resume to continue it, "
                             "or choose another --output_dir")
        return out
    if not (out / "args.json").exists() or (out / "eval.json").exists():
        raise SystemExit(f"error: --resume: '{out}' holds no unfinished run (args.json without eval.json)")
    recorded = json.load(open(out / "args.json"))
    recorded["processes"] = recorded["run"]["processes"]
    current = {**json.loads(json.dumps(asdict(args))), "processes": world_size()}  # tuples as lists
    if reshard and recorded["batch_size"] * recorded["processes"] == args.batch_size * world_size():
        current.update(batch_size=recorded["batch_size"], processes=recorded["processes"])  # DCP reshards
    changed = [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in current.items()
               if k not in ("output_dir", "resume", "dry_run", "save_every", "report_to", "run_name")
               and recorded.get(k) != v]
    if changed:
        raise SystemExit(f"error: --resume: arguments differ from the run in '{out}' ({'; '.join(changed)}); "
                         "resume with the same ones (or the same global batch on other processes)")
    return out


def create_output_dir(out: Path, args, device, dtype: str, resume_step: Optional[int] = None) -> None:
    """A new run writes args.json and its provenance; a resumed one drops the records after its checkpoint."""
    if rank() > 0:  # rank 0 writes
        return
    if resume_step is not None:  # what followed the checkpoint is logged again (all of it, without one)
        if not resume_step:
            print(f"note: --resume: '{out}' has no complete checkpoint yet; starting from the beginning")
        log_file = out / "metrics.jsonl"
        records = [json.loads(line) for line in open(log_file)] if log_file.exists() else []
        steps = [r.get("step", r.get("iteration")) for r in records]
        write_jsonl(log_file, [r for r, step in zip(records, steps) if resume_step and step <= resume_step])
        return
    import subprocess
    from importlib.metadata import version

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    run = {"command": " ".join(sys.argv), "script": Path(__file__).name, "git_commit": commit,
           "python": sys.version.split()[0], "torch": torch.__version__,
           "transformers": version("transformers"), "datasets": version("datasets"), "device": str(device),
           "dtype": dtype, "processes": world_size(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "args.json", "w") as f:
        json.dump({**asdict(args), "run": run}, f, indent=2)


def save_model(model, tokenizer, out: Path) -> None:
    """The final model in `out`, written by rank 0 from the full weights (cpu_offload: rank 0 alone keeps
    them) with config.json last: no loadable half-model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() > 0:
        return
    for name in model.all_tied_weights_keys:  # gathered copies of tied weights share no memory: saved once
        weights.pop(name, None)
    tmp = out / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, out / f.name)
    tmp.rmdir()


def save_checkpoint(models: list, optimizer, scheduler, out: Path, step: int, progress: dict) -> None:
    """out/checkpoint-<step>: a DCP folder of every process's shards of the models and AdamW moments, the
    step, schedule and progress (the log window summed over processes) and each process's random state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = out / f"checkpoint-{step:06d}"  # counts once DCP writes .metadata, last: see last_checkpoint
    if rank() == 0:  # a save cut short may have left this folder half written
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    if world_size() > 1:
        torch.distributed.barrier()
    window = progress["window"]
    progress = {**progress, "window": dict(zip(window, summed(list(window.values()))))}
    if rank() == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "progress": progress},
                   folder / "trainer_state.pt")
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    torch.save({"torch": torch.get_rng_state(), "cuda": cuda}, folder / f"random-{rank()}.pt")
    model_state, optimizer_state = get_state_dict(torch.nn.ModuleList(models), optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    if rank() == 0:
        for old in out.glob("checkpoint-*"):
            if old != folder:
                shutil.rmtree(old)


def last_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint: a save cut short has no .metadata, and the previous one counts."""
    return max((f.parent for f in out.glob("checkpoint-*/.metadata")), default=None)


def restore(checkpoint: Path, models: list, optimizer, scheduler) -> tuple:
    """The models, AdamW moments (resharded by DCP), schedule and random states as saved: (step, progress)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    modules = torch.nn.ModuleList(models)
    model_state, optimizer_state = get_state_dict(modules, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(modules, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer = torch.load(checkpoint / "trainer_state.pt", weights_only=False, map_location="cpu")
    scheduler.load_state_dict(trainer["scheduler"])
    if rank() > 0:  # the window holds every process's rows: rank 0 alone keeps it
        trainer["progress"]["window"] = {}
    if (checkpoint / f"random-{rank()}.pt").exists():  # a process the saving run lacked keeps its seed
        states = torch.load(checkpoint / f"random-{rank()}.pt", map_location="cpu")
        torch.set_rng_state(states["torch"])
        if states["cuda"] is not None:
            torch.cuda.set_rng_state(states["cuda"])
    print(f"resuming from {checkpoint} (step {trainer['step']})")
    return trainer["step"], trainer["progress"]


def finish(out: Path, results: dict, tracker) -> dict:
    """Writes eval.json, which ends a run (and its tracker's), and removes its resumable checkpoints."""
    if rank() > 0:
        return results
    with open(out / "eval.json", "w") as f:
        json.dump(results, f, indent=2)
    tracker.finish(results)
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    print(f"\nsaved to {out}: " + json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
