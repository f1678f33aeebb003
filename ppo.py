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

The paper prints pi_ref in the denominator of Eq. 5; standard PPO (and this file) divides by pi_old,
the policy that generated the rollout. The loop's order is the paper's (App. G), not CleanRL's: CleanRL
computes log-probs, values and advantages once per batch, before any update; Tulu 2.5 computes them
per minibatch, from the current models, so a later optimiser step's "old" policy and values already
carry the earlier steps' updates (its first ratio is exactly 1); with one step per batch (the default)
the two orders coincide. A step takes Table 9's b x g episodes in g forward-backward passes of b, its
loss one token mean over them all (Table 11's B = 512, r = 2, b = 64, g = 2 is `--batch_size 512
--num_rollouts_per_prompt 2 --minibatch_size 64 --gradient_accumulation_steps 2`). Fixed beta, no
reward normalisation or whitening, advantage whitening (Table 10). Log-probs are computed from
logits / temperature, the distribution the rollout sampled.

Real checkpoints: the rollout samples exactly softmax(logits / T) (a complete generation config built
from the arguments; the checkpoint's own sampling settings, such as a repetition penalty, are never
inherited), so the ratio and the KL describe the sampler. A response ends at its first stop id (the
tokenizer's EOS or any `eos_token_id` of the generation config): the EOS trick penalises only responses
that never stopped, and the tokens after a stop are padding in every mask, length and KL. The score
is read at the stop token, the position the reward model was trained on. Dropout is off in the policy
and value model (`--dropout` keeps it for the update), and the "old" log-probs, values and reference
log-probs are computed in eval mode, so the first minibatch starts on-policy (ratio 1).

Many GPUs (`torchrun`, README "Many GPUs"): each process rolls out --batch_size prompts of its own (the
global batch is --batch_size x processes), scores them and updates on its own minibatches; the
advantages are whitened over every process's step together and FSDP averages the gradients.
Rollouts stay `model.generate` on the sharded policy, which gathers every layer's weights for each
new token: fine for a small model, slow for a 7B one, whose rollouts belong in a serving engine (vLLM
or the like) holding a bf16 copy of the policy refreshed after each iteration: not built here.

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
    """PPO: align an SFT policy against a frozen reward model. Each iteration samples responses to a
    batch of prompts, scores them, turns the scores minus a KL penalty (beta) to the reference into
    per-token rewards, estimates advantages with a value model (GAE) and takes clipped policy and value
    steps; then samples held-out prompts and scores them. The defaults align the toy's pi_sft (toy/sft)
    against its reward model (toy/rm).

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
    """keep the checkpoint's dropout in the policy and value model for the update (default: off, so the
    first update starts on-policy); the rollout's log-probs and values are taken in eval mode either way"""

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
    """inner epochs (e): passes, one optimiser step each, over a step's b x g episodes right after their
    old log-probs and values (App. G); Table 9's "inner epochs trained for each batch" passes over the
    whole batch instead, the same when one step takes it all (b x g = B r, the default)"""
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
    """temperature of the end-of-run samples (None: the rollout temperature, the sampler PPO trained;
    1.0 compares with the other scripts' defaults)"""
    output_dir: Optional[str] = None
    """where the run goes (default: runs/ppo-<time>); must be empty unless --overwrite"""
    overwrite: bool = False
    """replace the contents of an existing, non-empty output_dir"""
    log_every: int = 10
    """iterations between log lines"""
    save_every: int = 0
    """iterations between checkpoints of the policy and value model (output_dir/checkpoint-<iteration>,
    the last one kept; 0: none); PPO cannot --resume: a checkpoint is models to load, not a run"""
    dry_run: bool = False
    """print one formatted, tokenised prompt and the counts, then stop before loading any model and
    write nothing: the first thing to run on new data"""
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
    problems = [
        (args.max_prompt_length < 1,
         f"--max_prompt_length must be at least 1 (got {args.max_prompt_length})"),
        (args.beta < 0, f"--beta must be 0 (no KL penalty) or more (got {args.beta}); below 0 the policy is "
                        "rewarded for moving away from the reference"),
        (args.temperature <= 0, f"--temperature must be positive (got {args.temperature}); PPO samples, and "
                                "its log-probs are taken from logits / temperature"),
        (args.eval_temperature is not None and args.eval_temperature <= 0,
         f"--eval_temperature must be positive (got {args.eval_temperature}); leave it unset for the "
         "rollout temperature"),
        (args.max_new_tokens < 1, f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})"),
        (args.batch_size < 1, f"--batch_size must be at least 1 (got {args.batch_size})"),
        (args.num_rollouts_per_prompt < 1,
         f"--num_rollouts_per_prompt must be at least 1 (got {args.num_rollouts_per_prompt})"),
        (args.minibatch_size < 1, f"--minibatch_size must be at least 1 (got {args.minibatch_size})"),
        (args.gradient_accumulation_steps < 1,
         f"--gradient_accumulation_steps must be at least 1 (got {args.gradient_accumulation_steps})"),
        (args.ppo_epochs < 1, f"--ppo_epochs must be at least 1 (got {args.ppo_epochs})"),
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
        (args.minibatch_size >= 1 and args.gradient_accumulation_steps >= 1  # no division by 0 here
         and episodes_per_batch % (args.minibatch_size * args.gradient_accumulation_steps) > 0,
         f"--batch_size * --num_rollouts_per_prompt ({episodes_per_batch}) must be a multiple of "
         f"--minibatch_size x --gradient_accumulation_steps ({args.minibatch_size} x "
         f"{args.gradient_accumulation_steps}: the episodes of one optimiser step)"),
        (args.log_every < 1, f"--log_every must be at least 1 (got {args.log_every})"),
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
    """Dropout off: every nn.Dropout, and the rates that attention layers keep as plain floats (Llama's
    and Qwen2's `attention_dropout`), which no module switch reaches. With dropout, the policy in train
    mode is not the model whose log-probs the reference (or the rollout) recorded: DPO's implicit
    rewards and PPO's ratio would be off before the first update."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


@torch.no_grad()
def rollout(policy, tokenizer, prompts: list, args, device, stop_ids: list) -> dict:
    """Step 1: one response per prompt sampled from softmax(logits / T) (KV-cached), cut after its first
    stop id. Returns query (B, Q) left-padded and response (B, R) with its mask: 1 up to and including
    the stop token, 0 after it (those tokens become padding); `finished`: (B,), a stop id was reached."""
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
    """log pi(y_t | x, y_<t) of every response token from logits / temperature, in fp32, and (only
    when asked: the update logs it) the per-token entropy of that distribution. The LM head runs at
    the response positions only, and log-probs are gather minus logsumexp over chunks of positions,
    so no fp32 (B, R, V) log-softmax is held. Returns (B, R) log-probs and (B, R) entropies or None."""
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


def scalar_head(model, mb: dict, autocast) -> torch.Tensor:
    """The score head of a sequence-classification model at every position (the backbone's hidden
    states through its `score` layer), fp32. Returns (B, Q + R)."""
    backbone = getattr(model, model.base_model_prefix)
    with autocast:
        hidden = backbone(**full_inputs(mb)).last_hidden_state
        return model.score(hidden).squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token, with left or right padding. (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(1)


def values_and_scores(model, mb: dict, autocast) -> tuple:
    """V(x, y_<t) for every response token t (read at position Q-1+t), and the output at each
    response's last real token: the reward model's score, from the same head. Each (B, R) and (B,)."""
    Q = mb["query"].shape[1]
    out = scalar_head(model, mb, autocast)
    last = last_token_index(full_inputs(mb)["attention_mask"])  # the stop token (or a cut response's last)
    return out[:, Q - 1 : -1], out[torch.arange(out.shape[0]), last]


def take(batch: dict, index) -> dict:
    return {k: v[index] for k, v in batch.items()}


# ---- Training -------------------------------------------------------------------------------------


def load_models(args, pad_id: int, device) -> tuple:
    """The four models: the policy (trained), the reference and the reward model (frozen), and the
    value model (trained), from the reward model unless --value_model names another. Dropout is off
    in the two trained ones unless --dropout."""
    ref_name, value_name = args.ref or args.model, args.value_model or args.reward_model
    policy = place(load_model(args.model, args.trust_remote_code), device)
    ref_model = place(load_model(ref_name, args.trust_remote_code), device, frozen=True)
    reward_model = load_scalar_model(args.reward_model, pad_id, args.trust_remote_code)
    reward_model = place(reward_model, device, frozen=True)
    # the reward model must have a trained head; a value model given explicitly may start from a causal
    # LM, its head then random (the paper starts V from the reward model)
    value_model = place(load_scalar_model(value_name, pad_id, args.trust_remote_code,
                                          new_head=args.value_model is not None), device)
    if not args.dropout:
        disable_dropout(policy), disable_dropout(value_model)
    return policy, ref_model, reward_model, value_model


@torch.no_grad()
def rollout_forwards(policy, ref_model, reward_model, value_model, mb: dict, args, autocast) -> tuple:
    """Steps 2-4's forward passes over a step's episodes, b at a time (the update's shapes: the first ratio
    is exactly 1): the scores (B,); the policy's and pi_ref's log-probs and the values (B, R)."""
    parts = []
    for a in range(0, len(mb["mask"]), args.minibatch_size):
        part = take(mb, slice(a, a + args.minibatch_size))
        _, scores = values_and_scores(reward_model, part, autocast)
        old_logprobs, _ = policy_logprobs(policy, part, args.temperature, autocast)
        ref_logprobs, _ = policy_logprobs(ref_model, part, args.temperature, autocast)
        old_values, _ = values_and_scores(value_model, part, autocast)
        parts.append((scores, old_logprobs, ref_logprobs, old_values))
    return tuple(torch.cat(x) for x in zip(*parts))


def ppo_update(policy, value_model, mb: dict, old: dict, args, autocast) -> dict:
    """One epoch of step 5 on a step's b x g episodes: the clipped losses (Eq. 5, 6), L_pi + alpha L_V,
    in g forward-backward passes of b, each weighted by its share of the tokens: one token mean over the
    step, whatever g. `old`: steps 2-4's quantities; the caller steps. Returns the stats, one per pass."""
    stats, n_tokens = {}, all_sum(old["mask"].sum()) / world_size()  # FSDP averages: the global token mean
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
    return stats


@torch.no_grad()
def evaluate(policy, ref_model, reward_model, tokenizer, prompts: list, args, device, autocast,
             stop_ids: list, path: Path) -> dict:
    """The end-of-run samples, drawn by `rollout` (the training's own sampler) at --eval_temperature
    (default: the rollout's) with a fixed seed; each response's raw reward-model score (no EOS
    penalty), and log pi_T(y|x) - log pi_ref,T(y|x) summed over its tokens, whose mean over samples
    estimates KL(pi_T || pi_ref,T). The samples go to `path`; returns the metrics."""
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
                rows.append({"prompt": prompt, "score": scores[j].item(), "logratio": logratios[j].item(),
                             "length": n, "finished": batch["finished"][j].item(),
                             "response": tokenizer.decode(batch["response"][j, :n],
                                                          skip_special_tokens=True)})
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
    out = None if args.dry_run else check_output_dir(args, "ppo", [args.model, *others], resume=None)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    stop_ids, pad_id = stop_token_ids(tokenizer, args.model), tokenizer.pad_token_id
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

    policy, ref_model, reward_model, value_model = load_models(args, pad_id, device)
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
            policy.eval(), value_model.eval()  # "old" quantities without dropout, whatever --dropout says
            with torch.no_grad():
                # 2. score with the current models (App. G: per minibatch), with the EOS trick
                scores, old_logprobs, ref_logprobs, old_values = rollout_forwards(
                    policy, ref_model, reward_model, value_model, mb, args, autocast)
                scores = eos_trick(scores, mb["finished"], args.missing_eos_penalty)
                # 3. KL-penalised token rewards (Eq. 4): fixed beta, no reward normalisation or whitening
                rewards = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, args.beta)
                # 4. GAE (gamma 1, lambda 0.95), then the advantages whitened over the step's episodes
                advantages, returns = compute_gae(rewards, old_values * mask, mask, args.gamma, args.lam)
                advantages = masked_whiten(advantages, mask)
            policy.train(), value_model.train()
            kl = ((old_logprobs - ref_logprobs) * mask).sum(1)
            append(stats, {"objective/score": scores.mean(), "objective/kl": kl.mean(),
                           "objective/non_score_reward": (-args.beta * kl).mean(),
                           "val/eos_rate": mb["finished"].float().mean(), "val/length": mask.sum(1).mean()})
            old = {"logprobs": old_logprobs, "values": old_values, "advantages": advantages,
                   "returns": returns, "mask": mask}
            # 5. clipped updates (Eq. 5, 6), --ppo_epochs passes over the step's episodes
            for _ in range(args.ppo_epochs):
                for key, values in ppo_update(policy, value_model, mb, old, args, autocast).items():
                    stats.setdefault(key, []).extend(values)
                g = args.gradient_accumulation_steps  # the finiteness check sees every pass of the step
                loss = sum(stats["ppo/policy_loss"][-g:]) + sum(stats["ppo/value_loss"][-g:])
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
    """A bad argument, found before any work: `cli` prints "error: <message>" and exits with code 2, as
    for a malformed command line (str() gives the message, for code that calls main directly)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = f"error: {message}"

    def __str__(self) -> str:
        return self.message


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup from 0, then linear or cosine decay to `floor`, or
    (schedule "constant") the peak rate from then on."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


def prompt_stream(prompts: list, batch_size: int, seed: int):
    """Endless stream of shuffled batches of prompts, epoch after epoch (an epoch's remainder is dropped).
    Under torchrun, each global batch of batch_size x N prompts is cut in N: process r rolls out part r."""
    me, world, g = rank(), world_size(), torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(prompts), generator=g).tolist()
        for i in range(0, len(order) - batch_size * world + 1, batch_size * world):
            yield [prompts[j] for j in order[i + me * batch_size : i + (me + 1) * batch_size]]


def append(stats: dict, values: dict) -> None:
    """Appends each value (a float or a 0-d tensor) to its list in `stats`."""
    for k, v in values.items():
        stats.setdefault(k, []).append(v.item() if torch.is_tensor(v) else v)


def resolve(path: str) -> str:
    """A relative path that is not under the working directory but is next to this script (the toy
    defaults) resolves there, so `python ~/minialign/sft.py` works from any folder; `~` is expanded."""
    path = os.path.expanduser(path)
    here = Path(__file__).resolve().parent / path
    return str(here) if not Path(path).exists() and here.exists() else path


def locate(name: str, what: str) -> str:
    """The path `name` resolves to, or `name` as a hub id. A name that looks like a path (./x, /x, ~/x,
    a/b/c, x.jsonl, or a/b where the folder a exists here: a typo in runs/my-run) and does not exist
    fails at once, instead of after a minute of trying the hub."""
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


def field_problem(value) -> Optional[str]:
    """Why a text field of a row is unusable, or None: it must be a string or a list of messages."""
    if value is None:
        return "is missing"
    if isinstance(value, str) or (isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)):
        return None
    return (f"is {type(value).__name__} {str(value)[:40]!r}; expected a string or a list of "
            "{role, content} messages")


def load_split(name: str, split: str, needs: list):
    """One split of a hub dataset, a local directory of {split}.jsonl files, or a .jsonl file (its rows
    are the split "train", so train[:100] slices it; load_splits holds some out for evaluation).
    `needs` lists alternatives: each a tuple of columns that together suffice. Every row's fields are
    checked here, so a bad row fails with its number, not deep inside."""
    from datasets import load_dataset

    path = locate(name, "dataset")
    one_file = path.endswith((".json", ".jsonl"))
    where = f"dataset '{name}'" if one_file else f"split '{split}' of dataset '{name}'"
    file = Path(path) if one_file else Path(path) / f"{split.split('[')[0]}.jsonl"
    if file.is_file() and not any(line.strip() for line in open(file)):
        raise SystemExit(f"error: {where} is empty: {file} has no rows")
    try:
        data = (load_dataset("json", data_files=path, split=split if split.startswith("train") else "train")
                if one_file else load_dataset(path, split=split))  # a file's rows are its split "train"
    except Exception as e:  # datasets raises many types; all mean the same to a user
        raise load_failure(name, f"split '{split}' of dataset", e)
    columns = next((cols for cols in needs if set(cols) <= set(data.column_names)), None)
    if columns is None:
        wanted = " or ".join("+".join(cols) for cols in needs)
        raise SystemExit(f"error: {where} has columns {data.column_names}; it needs {wanted}")
    if len(data) == 0:
        raise SystemExit(f"error: {where} has no rows")
    columns = list(dict.fromkeys([c for c in ("prompt",) if c in data.column_names] + list(columns)))
    for i, row in enumerate(data.select_columns(columns)):
        for column in columns:
            problem = field_problem(row[column])
            if problem and not (column == "prompt" and row[column] == ""):
                raise SystemExit(f"error: {where}, row {i + 1}: field '{column}' {problem}")
    return data


def load_splits(name: str, train_split: str, eval_split: Optional[str], needs: list, eval_fraction: float,
                seed: int) -> tuple:
    """(train rows, eval rows or None). One .jsonl file has no splits: a shuffled `eval_fraction` of its
    rows is held out for evaluation and never trained on, and the counts are printed; a run never
    evaluates on its own training rows."""
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
    """The prompts of at most max_prompt_length tokens as the model sees them (Table 9's L_p: one long
    prompt would set the memory of its whole batch); the others are dropped, and counted."""
    kept = []
    for prompt in prompts:
        ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=not isinstance(prompt, list))
        if len(ids["input_ids"]) <= max_prompt_length:
            kept.append(prompt)
    if len(kept) < len(prompts):
        print(f"note: {where}: dropped {len(prompts) - len(kept)} of {len(prompts)} prompts longer than "
              f"--max_prompt_length {max_prompt_length} tokens")
    if not kept:
        raise SystemExit(f"error: {where}: every prompt is longer than --max_prompt_length "
                         f"{max_prompt_length} tokens; raise it")
    return kept


# Used only for a tokenizer without a chat template; documented in the README.
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
    """Models that exchange token ids must share vocabulary and chat template, or scores are noise: each
    other model's tokenizer is checked against `tokenizer` (of own_name), each distinct name loaded once."""
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
    """Every token id that ends a response: the tokenizer's EOS, then each id in the checkpoint's
    generation_config.json `eos_token_id` (an int or a list: chat models often list their end-of-turn
    and end-of-text tokens, and generation stops on any of them)."""
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
    """Refuses, before loading any weights, a checkpoint of the wrong kind: a reward model
    (...ForSequenceClassification) where a causal LM is needed, or a causal LM (...ForCausalLM) as a
    reward model, whose score head would be random."""
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
    """A reward (or value) model: AutoModelForSequenceClassification with one output. A checkpoint with
    no trained score head (a causal LM) is refused unless `new_head` (a value model may start from one).
    A config without pad_token_id gets the tokenizer's (transformers refuses padded batches without
    one); `score` reads the reward at the index the attention mask gives, whatever the pad id."""
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
    """model.generate with `config` and nothing else (KV-cached). transformers fills every field a
    config leaves unset from the checkpoint's generation_config.json (a repetition penalty, min_p,
    suppressed tokens...), which would change the distribution sampled, so that one is set aside."""
    checkpoint_config, model.generation_config = model.generation_config, config
    try:  # under FSDP every process runs the forward passes until all have finished (synced_gpus)
        return model.generate(**batch, generation_config=config, synced_gpus=world_size() > 1)
    finally:
        model.generation_config = checkpoint_config


def setup(args) -> tuple:
    """Seeds, device (cuda when present; under torchrun this process's GPU) and compute dtype (bf16
    autocast on CUDA, fp32 elsewhere); transformers' per-load reports and progress bars hidden unless
    --verbose. (device, dtype, autocast)"""
    import datasets
    import transformers

    if not args.verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    device = start_processes(device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return device, dtype, torch.autocast(device.type, dtype=torch.bfloat16, enabled=(dtype == "bfloat16"))


# ---- Many processes: torchrun --nproc_per_node N <script>.py ... (FSDP2). Without torchrun, none of
# this does anything. Every process holds 1/N of each model (its weights, and for the trained ones their
# gradients and AdamW state), trains on its share of each global batch and runs every evaluation in
# full (simple, and evaluations are small); rank 0 alone prints, logs and writes. Collectives pair
# numbers by position: every process computes the same keys in the same order.


def rank() -> int:
    """This process's number, 0 to world_size() - 1: 0 without torchrun."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    """The number of processes: 1 without torchrun."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def start_processes(device):
    """Under torchrun (which sets LOCAL_RANK), joins the process group: NCCL between GPUs (this
    process's GPU is cuda:LOCAL_RANK), gloo on CPUs. Ranks above 0 print nothing and show no progress
    bar (quiet). Returns the device."""
    if "LOCAL_RANK" not in os.environ or torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return device


def place(model, device, frozen: bool = False):
    """The model on `device` (`frozen`: in eval mode, without gradients); under torchrun, sharded over
    the processes with FSDP2: each decoder layer, then the rest (embeddings, head), so that a forward
    pass gathers one layer's full weights at a time. A frozen model (reference, reward) is sharded too:
    replicated, a 13B one would take 52 GB of fp32 on every GPU. With bf16, the gathered weights stay
    fp32 and the forward runs under the same autocast as one process: twice the all-gather bytes of bf16
    weights, for the numbers of one process (FSDP's bf16 policy would run the whole model in bf16,
    residual stream included, which autocast on one process does not: SFT's first loss 1.2e-3 apart)."""
    model = model.to(device)
    if frozen:
        model.eval().requires_grad_(False)
    if world_size() == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    # FSDP keeps a root's weights gathered from its forward pass to its backward pass, which a frozen
    # model never has: frozen, every unit reshards after its forward pass
    shard = dict(reshard_after_forward=True if frozen else None)
    for module in model.modules():
        if type(module).__name__ in (model._no_split_modules or []):  # the decoder layers
            fully_shard(module, **shard)
    if hasattr(model, "score"):  # a scalar model: score() calls its backbone and head, not the whole
        fully_shard(getattr(model, model.base_model_prefix), **shard)
        fully_shard(model.score, **shard)
    return fully_shard(model, **shard)


def summed(numbers: list) -> list:
    """The numbers, each summed over the processes (as they are in one process)."""
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
    """A state dict (a model's or an optimiser's) with each FSDP shard (a DTensor) gathered into its full
    tensor (every process takes part), kept on rank 0's CPU for it to save, None elsewhere: the files
    are those of a one-process run."""
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
    """tqdm's `disable`: True on ranks above 0 (one progress bar), else None (tqdm's choice: a bar on a
    terminal only)."""
    return True if rank() > 0 else None


def start_training(models: list, args, total_steps: int, schedule: str, floor: float = 0.0,
                   eps: float = 1e-8) -> tuple:
    """The models in train mode (with gradient checkpointing if asked), one fused AdamW over all their
    parameters (one kernel for all tensors), and warmup then `schedule` (lr_factor). (optimizer, scheduler)"""
    for model in models:
        model.train()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
    params = [p for model in models for p in model.parameters()]
    fused = params[0].device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=args.adam_betas, eps=eps,
                                  weight_decay=args.weight_decay, fused=fused)
    warmup = int(args.warmup_ratio * total_steps)
    if world_size() > 1:  # the models loaded alike; now each process draws its own samples, dropout masks
        torch.manual_seed(args.seed + rank())
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, schedule, floor))


def optimizer_step(optimizer, scheduler, max_grad_norm: float, loss: float, when: str) -> float:
    """Clips the gradient norm, steps and zeroes the gradients, unless the loss or the gradient is not
    finite: then the run stops before the update, saying `when`. Returns the norm before clipping. Under
    torchrun, `loss` is summed over the processes and the norm is that of the whole gradient, so every
    process stops, or steps, together."""
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


def write_jsonl(path: Path, rows: list) -> None:
    if rank() > 0:  # rank 0 writes
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def log(out: Path, record: dict) -> None:
    """One record appended to out/metrics.jsonl, and the same as one printed line. Under torchrun every
    process calls it: each float is first averaged over the processes (a throughput is then per process,
    a PPO statistic of the minibatch that of the global one; a train_record, already reduced by means,
    stays as it is) and rank 0 writes."""
    if world_size() > 1:
        floats = [k for k, v in record.items() if isinstance(v, float)]
        for k, total in zip(floats, summed([record[k] for k in floats])):
            record[k] = total / world_size()
    if rank() > 0:
        return
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def run_info(device, dtype: str) -> dict:
    """What a reader needs to reproduce a run besides its arguments."""
    import subprocess

    import datasets
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"command": " ".join(sys.argv), "script": Path(__file__).name, "git_commit": commit,
            "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "device": str(device), "dtype": dtype, "processes": world_size(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def check_output_dir(args, script: str, models: list, resume: Optional[bool]) -> Path:
    """Fails before any work if the run would overwrite a previous one; writes nothing. With --resume,
    the directory must hold an unfinished run with the same arguments. `resume` None: the script
    cannot resume. Sets args.output_dir (the default is runs/<script>-<time>). Only rank 0 checks: the
    others would race with its writing (torchrun stops them all when one fails)."""
    out = Path(args.output_dir or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.output_dir = str(out)
    if rank() > 0:
        return out
    if any(Path(resolve(m)).resolve() == out.resolve() for m in models):
        raise UsageError(f"output_dir '{out}' holds a model this run reads; choose another")
    if resume:
        if not (out / "args.json").exists():
            raise UsageError(f"--resume: '{out}' holds no run to continue (no args.json); drop --resume")
        if (out / "eval.json").exists():
            raise UsageError(f"--resume: the run in '{out}' finished (it has eval.json); nothing to continue")
        recorded = json.load(open(out / "args.json"))
        recorded["processes"] = recorded.get("run", {}).get("processes", 1)  # the data order depends on it
        current = {**json.loads(json.dumps(asdict(args))), "processes": world_size()}  # tuples as lists
        changed = [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in current.items()
                   if k not in ("output_dir", "overwrite", "resume", "dry_run", "verbose", "save_every")
                   and recorded.get(k) != v]
        if changed:
            raise UsageError(f"--resume: arguments differ from the run in '{out}' ({'; '.join(changed)}); "
                              "resume with the same ones")
        return out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        hint = "--resume to continue it, " if resume is not None else ""
        raise UsageError(f"output_dir '{out}' already holds a run; pass {hint}--overwrite to start over, or "
                          "choose another --output_dir")
    return out


def create_output_dir(out: Path, args, device, dtype: str, resume_step: Optional[int] = None) -> None:
    """Called once the inputs have loaded. A new run: empties an --overwrite'n dir, writes args.json (the
    arguments, then under "run" the versions, device, dtype and git commit). A resumed run keeps the
    metrics logged up to its checkpoint and drops the later ones, which the run will log again."""
    if rank() > 0:  # rank 0 writes
        return
    if resume_step is not None:
        log_file = out / "metrics.jsonl"
        records = [json.loads(line) for line in open(log_file)] if log_file.exists() else []
        write_jsonl(log_file, [r for r in records if r.get("step", 0) <= resume_step])
        return
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with open(out / "args.json", "w") as f:
        json.dump({**asdict(args), "run": run_info(device, dtype)}, f, indent=2)


def check_finite(weights: dict, when: str) -> None:
    """Refuses to save weights (name -> tensor) that hold a NaN or an infinity."""
    bad = [n for n, p in weights.items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise SystemExit(f"error: {len(bad)} weight tensors are non-finite {when} (first: {bad[0]}); "
                         "nothing saved. Try a lower --learning_rate or float32")


def save_model(model, tokenizer, out: Path) -> None:
    """The final model, in `out` itself (loadable as --model out). Written to a temporary folder, then
    moved in with config.json last: until config.json is there, no loader takes the folder for a model,
    so a crash mid-save never leaves a loadable half-model. Non-finite weights are never saved. Under
    torchrun every process takes part in gathering the full weights, and rank 0 saves them."""
    full = gathered(model.state_dict(keep_vars=True)) if world_size() > 1 else None
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
    """A periodic checkpoint, out/checkpoint-<step>: each model in its subfolder ("." for the trained
    one, loadable as it is) and trainer_state.pt (optimiser, scheduler, progress, random states) unless
    `state` is None. It is written complete to a temporary folder and renamed into place in one step,
    and older checkpoints are removed only then: a kill at any moment leaves one complete checkpoint.
    Under torchrun the shards of the models and of the optimiser are gathered, and rank 0 saves them:
    the same files as a one-process run (--resume continues them with the same number of processes)."""
    many = world_size() > 1
    full = {folder: gathered(m.state_dict(keep_vars=True)) if many else None for folder, m in models.items()}
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    if many and state is not None:  # every process's random states, and the log window summed over all
        rngs = [None] * world_size()
        torch.distributed.all_gather_object(rngs, rng)
        rng = rngs
        window = state["progress"]["window"]
        progress = {**state["progress"], "window": dict(zip(window, summed(list(window.values()))))}
        state = gathered(state)
        state["progress"] = progress
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
    found = sorted(out.glob("checkpoint-*"))
    return found[-1] if found else None


def finish(out: Path, results: dict) -> dict:
    """eval.json ends a run: its resumable checkpoints are removed, as nothing is left to resume (a
    checkpoint without trainer_state.pt, PPO's, is models to start from, and stays). Rank 0 writes."""
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
    out = Path(output_dir) if output_dir else None
    if out is None or not (out / "args.json").exists():
        return "nothing was written"
    log_file = out / "metrics.jsonl"
    records = [json.loads(line) for line in open(log_file)] if log_file.exists() else []
    steps = [r.get("step", r.get("iteration")) for r in records]
    last = f", last at step {steps[-1]}" if steps else ""
    kept = f"args.json, metrics.jsonl ({len(records)} records{last})"
    checkpoint = last_checkpoint(out)
    kept += f", {checkpoint.name}" if checkpoint else ", no checkpoint yet"
    if "resume" not in json.load(open(out / "args.json")):
        return f"kept in {out}: {kept}; --overwrite --output_dir {out} starts over"
    again = "continues it" if checkpoint else "starts it again"
    return f"kept in {out}: {kept}; --resume --output_dir {out} {again}"


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
