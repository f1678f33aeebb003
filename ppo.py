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
import json
import math
import os
import random
import shutil
import sys
import time
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
    eval_fraction: float = 0.05
    """for a --prompts that is one .jsonl file: the fraction held out for the end-of-run samples"""
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
    """where the run goes (default: runs/ppo-<time>); must be empty unless --overwrite"""
    overwrite: bool = False
    """replace the contents of an existing, non-empty output_dir"""
    log_every: int = 10
    """iterations between log lines"""
    save_every: int = 0
    """iterations between checkpoints of the policy and value model (the last one kept; 0: none); PPO
    cannot --resume: a checkpoint is models to load, not a run"""
    dry_run: bool = False
    """print one formatted, tokenised prompt and the counts, then stop before loading or writing anything"""
    verbose: bool = False
    """show transformers' loading reports and progress bars"""

    # setup
    seed: int = 0
    """seed of the prompt order and the sampling"""
    device: str = "auto"
    """cuda, cpu, ... (auto: cuda when available)"""
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    """compute dtype: bfloat16 autocasts the forward pass (weights stay fp32); default bf16 on CUDA"""


def check_args(args: Args) -> None:
    """Every argument checked before anything is loaded or written: one line each, exit code 2."""
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
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


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
    """Clipped value loss: Eq. 6's 1/2 (V - G_t)^2, with V kept within clip of the rollout's values.
    Returns (loss, clipfrac)."""
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
    config = sampling_config(args.temperature, args.max_new_tokens, tokenizer.pad_token_id, stop_ids)
    response = generate(policy, batch, config)[:, batch["input_ids"].shape[1] :]
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


def load_models(args, pad_id: int, device) -> tuple:
    """The policy and the value model (trained; dropout off unless --dropout), the reference and the
    reward model (frozen). A --value_model may be a causal LM, its head then random (the paper: V from R)."""
    policy = place(load_model(args.model, args.trust_remote_code), device)
    ref_model = place(load_model(args.ref or args.model, args.trust_remote_code), device, frozen=True)
    reward_model = load_scalar_model(args.reward_model, pad_id, args.trust_remote_code)
    reward_model = place(reward_model, device, frozen=True)
    value_model = load_scalar_model(args.value_model or args.reward_model, pad_id, args.trust_remote_code,
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
    out = None if args.dry_run else check_output_dir(args, "ppo", [args.model, *others])
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    stop_ids = stop_token_ids(tokenizer, args.model)
    check_tokenizers(tokenizer, args.model, others, args.trust_remote_code)
    train_data, eval_data = load_splits(args.prompts, args.train_split, args.eval_split, [("prompt",)],
                                        args.eval_fraction, args.seed)
    train_prompts = drop_long_prompts(train_data["prompt"], tokenizer, args.max_prompt_length,
                                      "train prompts")
    eval_prompts = [] if eval_data is None else first(eval_data, args.num_eval_prompts)["prompt"]
    if eval_prompts:
        eval_prompts = drop_long_prompts(eval_prompts, tokenizer, args.max_prompt_length, "eval prompts")
    if len(train_prompts) < args.batch_size * world_size():  # the prompt stream would yield no batch
        raise UsageError(f"{len(train_prompts)} train prompts in '{args.prompts}' are fewer than one batch "
                         f"of --batch_size {args.batch_size} x {world_size()} process(es): lower "
                         "--batch_size, or give more prompts")
    episodes_per_batch = args.batch_size * args.num_rollouts_per_prompt  # per process under torchrun
    num_iterations = args.total_episodes // (episodes_per_batch * world_size())
    step_size = args.minibatch_size * args.gradient_accumulation_steps  # episodes per optimiser step: b x g
    total_steps = num_iterations * (episodes_per_batch // step_size) * args.ppo_epochs
    if args.dry_run:
        return dry_run(tokenizer, train_prompts, eval_prompts, num_iterations, total_steps, args)

    policy, ref_model, reward_model, value_model = load_models(args, tokenizer.pad_token_id, device)
    optimizer, scheduler = start_training([policy, value_model], args, total_steps, "constant",
                                          eps=args.adam_eps)  # Table 9: constant after warmup
    create_output_dir(out, args, device, dtype)
    print(f"ppo: {len(train_prompts)} train prompts, {num_iterations} iterations of {episodes_per_batch} "
          f"episodes x {world_size()} process(es), {total_steps} optimiser steps of {step_size} episodes, "
          f"beta {args.beta}, device {device}, {dtype}")

    stream = prompt_stream(train_prompts, args.batch_size, args.seed)
    times, window = {"rollout": 0.0, "update": 0.0}, {}
    for iteration in tqdm(range(1, num_iterations + 1), desc="ppo", dynamic_ncols=True, disable=quiet()):
        # 1. rollout: one response per prompt, sampled at --temperature and cut after its first stop id
        start = time.time()
        prompts = [p for p in next(stream) for _ in range(args.num_rollouts_per_prompt)]
        with autocast:  # sampled in the precision the old log-probs and the KL are taken in
            batch = rollout(policy, tokenizer, prompts, args, device, stop_ids)
        times["rollout"] += time.time() - start
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
        times["update"] += time.time() - start
        append(window, {key: sum(v) / len(v) for key, v in stats.items()})

        if iteration % args.log_every == 0 or iteration == num_iterations:
            elapsed = max(times["rollout"] + times["update"], 1e-9)
            log(out, {"iteration": iteration, "episodes": iteration * episodes_per_batch * world_size(),
                      **{k: sum(v) / len(v) for k, v in window.items()},
                      "train/lr": scheduler.get_last_lr()[0],
                      "perf/episodes_per_s": iteration * episodes_per_batch / elapsed,
                      "perf/rollout_fraction": times["rollout"] / elapsed})
            window = {}
        if args.save_every and iteration % args.save_every == 0 and iteration < num_iterations:
            save_checkpoint({".": policy, "value_model": value_model}, tokenizer, out, iteration, None)
    save_model(policy, tokenizer, out)

    elapsed = times["rollout"] + times["update"]
    results = {"train/iterations": num_iterations, "train/runtime_s": round(elapsed, 1),
               "perf/rollout_s": round(times["rollout"], 1), "perf/update_s": round(times["update"], 1),
               "perf/episodes_per_s": round(num_iterations * episodes_per_batch / max(elapsed, 1e-9), 2)}
    if eval_prompts:
        results.update(evaluate(policy, ref_model, reward_model, tokenizer, eval_prompts, args, device,
                                autocast, stop_ids, out / "samples.jsonl"))
    return finish(out, results)


# ---- Plumbing --------------------------------------------------------------------------------------
# The same text in every script that uses it (tests/test_twins.py): arguments, data files, tokenizers,
# loading models, the run's folder, logs and checkpoints. Safe to skip on a first reading.


class UsageError(SystemExit):
    """A bad argument, found before any work: `cli` prints "error: <message>" and exits with code 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = f"error: {message}"

    def __str__(self) -> str:  # the message, for code that calls main directly
        return self.message


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup from 0, then linear or cosine decay to `floor`, or constant."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


def prompt_stream(prompts: list, batch_size: int, seed: int):
    """Endless shuffled batches of prompts (an epoch's remainder dropped); under torchrun a part each."""
    me, world, g = rank(), world_size(), torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(prompts), generator=g).tolist()
        for i in range(0, len(order) - batch_size * world + 1, batch_size * world):
            yield [prompts[j] for j in order[i + me * batch_size : i + (me + 1) * batch_size]]


def resolve(path: str) -> str:
    """`~` expanded; a relative path missing here but present next to this script (the toy) resolves there."""
    path = os.path.expanduser(path)
    here = Path(__file__).resolve().parent / path
    return str(here) if not Path(path).exists() and here.exists() else path


def locate(name: str, what: str) -> str:
    """The path `name` resolves to, or `name` as a hub id; a missing path fails now, not after the hub."""
    path = resolve(name)
    if Path(path).exists():
        return path
    if (name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".json", ".jsonl"))
            or (name.count("/") == 1 and Path(name.split("/")[0]).is_dir())):
        raise SystemExit(f"error: {what} '{name}' not found: no such file or directory")
    return path


def load_failure(name: str, what: str, error: Exception) -> SystemExit:
    """One line for a name that could not be loaded, naming HF_HUB_OFFLINE when that is the reason."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline and not Path(resolve(name)).exists():
        return SystemExit(f"error: {what} '{name}' is not a local path and not in the Hugging Face cache, "
                          "and HF_HUB_OFFLINE=1 forbids downloading it: pass a local directory, or run "
                          "once online")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return SystemExit(f"error: could not load {what} '{name}': {reason}")


def load_split(name: str, split: str, needs: list):
    """One split of a hub dataset, a folder of {split}.jsonl files or one .jsonl file, every row checked."""
    from datasets import load_dataset

    path = locate(name, "dataset")
    one_file = path.endswith((".json", ".jsonl"))
    where = f"dataset '{name}'" if one_file else f"split '{split}' of dataset '{name}'"
    file = Path(path) if one_file else Path(path) / f"{split.split('[')[0]}.jsonl"
    if file.is_file() and not any(line.strip() for line in open(file)):
        raise SystemExit(f"error: {where} is empty: {file} has no rows")
    try:
        data = (load_dataset("json", data_files=path, split=split if split.startswith("train") else "train")
                if one_file else load_dataset(path, split=split))
    except Exception as e:  # datasets raises many types; all mean the same to a user
        raise load_failure(name, f"split '{split}' of dataset", e)
    columns = next((cols for cols in needs if set(cols) <= set(data.column_names)), None)
    if columns is None:
        wanted = " or ".join("+".join(cols) for cols in needs)
        raise SystemExit(f"error: {where} has columns {data.column_names}; it needs {wanted}")
    if len(data) == 0:
        raise SystemExit(f"error: {where} has no rows")
    columns = list(dict.fromkeys(["prompt"] * ("prompt" in data.column_names) + list(columns)))
    for i, row in enumerate(data.select_columns(columns)):
        for column, value in row.items():
            messages = isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
            if value is None:
                raise SystemExit(f"error: {where}, row {i + 1}: field '{column}' is missing")
            if not (isinstance(value, str) or messages):
                raise SystemExit(f"error: {where}, row {i + 1}: field '{column}' is {type(value).__name__} "
                                 f"{str(value)[:40]!r}; expected a string or a list of "
                                 "{role, content} messages")
    return data


def load_splits(name: str, train_split: str, eval_split: Optional[str], needs: list, eval_fraction: float,
                seed: int) -> tuple:
    """(train rows, eval rows or None); one .jsonl file holds out a shuffled `eval_fraction` for eval."""
    train = load_split(name, train_split, needs)
    if not eval_split:
        return train, None
    if not resolve(name).endswith((".json", ".jsonl")):
        return train, load_split(name, eval_split, needs)
    if not 0 < eval_fraction < 1 or len(train) < 2:
        raise SystemExit(f"error: '{name}' is one file ({len(train)} rows), with no separate eval split: "
                         "hold out rows with 0 < --eval_fraction < 1, or pass --eval_split None")
    parts = train.train_test_split(test_size=eval_fraction, seed=seed)
    print(f"note: '{name}' is one file: {len(parts['train'])} rows to train on, {len(parts['test'])} held "
          f"out for evaluation (--eval_fraction {eval_fraction})")
    return parts["train"], parts["test"]


def first(data, n: Optional[int]):
    """The first n rows of a dataset (all of them when n is None)."""
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


# Used only for a tokenizer without a chat template; documented in docs/conventions.md#data.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def load_tokenizer(name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(locate(name, "model"), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise load_failure(name, "the tokenizer of", e)
    if tokenizer.pad_token is None:
        print(f"note: the tokenizer of '{name}' has no pad token; using its EOS token for padding "
              "(padding is masked everywhere, so this changes no result)")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        print(f"note: the tokenizer of '{name}' has no chat template; conversations are formatted as "
              "'role: content<eos>' lines (PLAIN_CHAT_TEMPLATE)")
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def check_tokenizers(tokenizer, own_name: str, names: list, trust_remote_code: bool) -> None:
    """Models that exchange token ids must share vocabulary and chat template, or scores are noise."""
    for name in dict.fromkeys(names):
        if Path(resolve(name)).resolve() == Path(resolve(own_name)).resolve():
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
        listed = GenerationConfig.from_pretrained(resolve(name)).eos_token_id
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

    try:
        found = AutoConfig.from_pretrained(locate(name, "model"), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise load_failure(name, "model", e)
    found = found.architectures or []
    if found and not any(a.endswith(wanted) for a in found):
        kind = ("a causal LM (...ForCausalLM)" if wanted == "ForCausalLM"
                else "a reward model (...ForSequenceClassification)")
        raise SystemExit(f"error: '{name}' is a {'/'.join(found)} checkpoint; this needs {kind} here")


def describe_model(name: str, model) -> None:
    print(f"loaded '{name}': {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          "parameters")


def load_model(name: str, trust_remote_code: bool, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    check_architecture(name, trust_remote_code, "ForCausalLM")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            locate(name, "model"), dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
    except Exception as e:
        raise load_failure(name, "model", e)
    if info["missing_keys"]:
        raise SystemExit(f"error: '{name}' lacks weights a causal LM needs "
                         f"({sorted(info['missing_keys'])[:3]}); is it the right checkpoint?")
    describe_model(name, model)
    return model


def load_scalar_model(name: str, pad_token_id: int, trust_remote_code: bool, dtype=torch.float32,
                      new_head: bool = False):
    """A reward (or value) model: a sequence classifier with one output and a trained score head."""
    from transformers import AutoModelForSequenceClassification

    if not new_head:
        check_architecture(name, trust_remote_code, "ForSequenceClassification")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            locate(name, "model"), num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code,
            output_loading_info=True)
    except Exception as e:
        raise load_failure(name, "reward model", e)
    if info["missing_keys"] and not new_head:
        raise SystemExit(f"error: '{name}' has no trained score head ({sorted(info['missing_keys'])[:3]} "
                         "missing): train a reward model on it first (reward_model.py)")
    if info["missing_keys"]:
        print(f"note: '{name}' has no trained score head: it starts random, and only training moves it")
    describe_model(name, model)
    if model.config.pad_token_id is None:
        print(f"note: the config of '{name}' has no pad_token_id; using the tokenizer's ({pad_token_id})")
        model.config.pad_token_id = pad_token_id
    return model


def sampling_config(temperature: float, max_new_tokens: int, pad_token_id: int, stop_ids: list):
    """Pure sampling from softmax(logits / T), stopping on any stop id: no top-k, no top-p, no penalty."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                            max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=stop_ids)


def generate(model, batch: dict, config):
    """model.generate (KV-cached) with `config` alone, not the checkpoint's generation_config.json."""
    checkpoint_config, model.generation_config = model.generation_config, config
    try:  # under FSDP every process runs forward passes until all have finished (synced_gpus)
        return model.generate(**batch, generation_config=config, synced_gpus=world_size() > 1)
    finally:
        model.generation_config = checkpoint_config


def setup(args) -> tuple:
    """Seeds, device (joining torchrun's processes), dtype, quiet loading: (device, dtype, autocast)."""
    import datasets
    import transformers

    if not args.verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    random.seed(args.seed)
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


# ---- Many processes: torchrun --nproc_per_node N <script>.py ... (FSDP2); without torchrun, none of this
# does anything. Every process holds 1/N of each model (and of the trained ones' gradients and AdamW state),
# trains on its share of each global batch and runs every evaluation in full; rank 0 alone prints and
# writes. Collectives pair numbers by position: every process computes the same keys in the same order.


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def place(model, device, frozen: bool = False):
    """The model on `device` (`frozen`: eval mode, no gradients); under torchrun sharded with FSDP2, each
    decoder layer then the rest (frozen models too: a replicated 13B reference is 52 GB of fp32 per GPU).
    The gathered weights stay fp32 under one process's autocast: FSDP's bf16 policy would also run the
    residual stream in bf16 (SFT's first loss 1.2e-3 apart)."""
    model = model.to(device)
    if frozen:
        model.eval().requires_grad_(False)
    if world_size() == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    # a frozen model has no backward pass to keep its root's weights gathered for: reshard after forward
    shard = dict(reshard_after_forward=True if frozen else None)
    for module in model.modules():
        if type(module).__name__ in (model._no_split_modules or []):  # the decoder layers
            fully_shard(module, **shard)
    if hasattr(model, "score"):  # a scalar model: score() calls its backbone and head, not the whole
        fully_shard(getattr(model, model.base_model_prefix), **shard)
        fully_shard(model.score, **shard)
    return fully_shard(model, **shard)


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


def gathered(state):
    """A state dict with each FSDP shard gathered in full, on rank 0's CPU (None elsewhere)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        full = state.detach().full_tensor()
        return full.cpu() if rank() == 0 else None
    if isinstance(state, list):
        return [gathered(v) for v in state]
    if not isinstance(state, dict):
        return state
    full, done = {}, {}  # done: by id, so that a tensor under two names (tied embeddings) stays one
    for k, v in state.items():
        if id(v) not in done:
            done[id(v)] = gathered(v)
        full[k] = done[id(v)]
    return full


def quiet():
    """tqdm's `disable`: True on ranks above 0 (one progress bar), else None (a bar on a terminal only)."""
    return True if rank() > 0 else None


def start_training(models: list, args, total_steps: int, schedule: str, floor: float = 0.0,
                   eps: float = 1e-8) -> tuple:
    """Train mode (gradient checkpointing if asked), one fused AdamW, warmup then `schedule`."""
    for model in models:
        model.train()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
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


def log(out: Path, record: dict) -> None:
    """One record appended to out/metrics.jsonl and printed (floats averaged over the processes)."""
    floats = [k for k, v in record.items() if isinstance(v, float)]
    for k, total in zip(floats, summed([record[k] for k in floats])):
        record[k] = total / world_size()
    if rank() > 0:
        return
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def check_output_dir(args, script: str, models: list) -> Path:
    """Fails before any work if the run would overwrite another; sets args.output_dir. Writes nothing."""
    out = Path(args.output_dir or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.output_dir = str(out)
    if rank() > 0:  # only rank 0 checks (torchrun stops every process when one fails)
        return out
    if any(Path(resolve(m)).resolve() == out.resolve() for m in models):
        raise UsageError(f"output_dir '{out}' holds a model this run reads; choose another")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"output_dir '{out}' already holds a run; pass --overwrite to start over, or "
                         "choose another --output_dir")
    return out


def create_output_dir(out: Path, args, device, dtype: str) -> None:
    """Once the inputs have loaded: empties an --overwrite'n dir and writes args.json."""
    if rank() > 0:  # rank 0 writes
        return
    import subprocess

    import datasets
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    run = {"command": " ".join(sys.argv), "script": Path(__file__).name, "git_commit": commit,
           "python": sys.version.split()[0], "torch": torch.__version__,
           "transformers": transformers.__version__, "datasets": datasets.__version__, "device": str(device),
           "dtype": dtype, "processes": world_size(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with open(out / "args.json", "w") as f:
        json.dump({**asdict(args), "run": run}, f, indent=2)


def check_finite(weights: dict, when: str) -> None:
    """Refuses to save weights (name -> tensor) that hold a NaN or an infinity."""
    bad = [n for n, p in weights.items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise SystemExit(f"error: {len(bad)} weight tensors are non-finite {when} (first: {bad[0]}); "
                         "nothing saved. Try a lower --learning_rate or float32")


def save_model(model, tokenizer, out: Path) -> None:
    """The final model in `out` itself, moved in with config.json last (no loadable half-model)."""
    full = gathered(model.state_dict(keep_vars=True)) if world_size() > 1 else None  # every process gathers
    if rank() > 0:
        return
    check_finite(dict(model.named_parameters()) if full is None else full, "at the end of training")
    tmp = out / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=full)
    tokenizer.save_pretrained(tmp)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, out / f.name)
    tmp.rmdir()


def save_checkpoint(models: dict, tokenizer, out: Path, step: int, state: Optional[dict]) -> None:
    """out/checkpoint-<step>: the models and trainer_state.pt, renamed into place whole."""
    many = world_size() > 1
    full = {folder: gathered(m.state_dict(keep_vars=True)) if many else None for folder, m in models.items()}
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    if many and state is not None:  # every process's random states, and the log window summed over all
        rngs = [None] * world_size()
        torch.distributed.all_gather_object(rngs, rng)
        rng, window = rngs, state["progress"]["window"]
        state = {**gathered(state), "progress": {**state["progress"],
                                                  "window": dict(zip(window, summed(list(window.values()))))}}
    if rank() > 0:
        return
    for folder, model in models.items():  # all checked before anything is written
        weights = dict(model.named_parameters()) if full[folder] is None else full[folder]
        check_finite(weights, f"at step {step}")
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    for folder, model in models.items():
        model.save_pretrained(tmp / folder, state_dict=full[folder])
        tokenizer.save_pretrained(tmp / folder)  # each folder loads on its own
    if state is not None:
        torch.save({"step": step, **state, "random": rng}, tmp / "trainer_state.pt")
    os.replace(tmp, final)
    for old in out.glob("checkpoint-*"):
        if old != final:
            shutil.rmtree(old)


def last_checkpoint(out: Path) -> Optional[Path]:
    return max(out.glob("checkpoint-*"), default=None)


def finish(out: Path, results: dict) -> dict:
    """Writes eval.json, which ends a run, and removes its resumable checkpoints."""
    if rank() > 0:
        return results
    with open(out / "eval.json", "w") as f:
        json.dump(results, f, indent=2)
    for checkpoint in out.glob("checkpoint-*"):
        if (checkpoint / "trainer_state.pt").exists():
            shutil.rmtree(checkpoint)
    print(f"\nsaved to {out}: " + json.dumps(results, indent=1))
    return results


def describe_run(output_dir: Optional[str]) -> str:
    """What a stopped run left behind, in one line (printed on Ctrl-C)."""
    out = Path(output_dir or "")
    if not output_dir or not (out / "args.json").exists():
        return "nothing was written"
    log_file, checkpoint = out / "metrics.jsonl", last_checkpoint(out)
    records = [json.loads(line) for line in open(log_file)] if log_file.exists() else []
    last = f", last at step {records[-1].get('step', records[-1].get('iteration'))}" if records else ""
    kept = checkpoint.name if checkpoint else "no checkpoint yet"
    return (f"kept in {out}: args.json, metrics.jsonl ({len(records)} records{last}), {kept}; "
            f"--overwrite --output_dir {out} starts over")


def cli(argv: Optional[list] = None) -> None:
    """The command line. Ctrl-C stops the run with one line saying what was kept; exit code 130."""
    args = tyro.cli(Args, args=argv)
    try:
        main(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {describe_run(args.output_dir)}", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    cli()
