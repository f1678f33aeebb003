# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch==2.13.0",
#     "transformers==5.23.0",
#     "datasets==5.2.0",
#     "tyro==1.0.17",
# ]
# ///
"""Direct preference optimisation (DPO): preference learning without a reward model or sampling.

Tulu 2.5 (Ivison et al., 2024) Eq. 3; DeRa (Liu et al., 2024) Appendix C; Rafailov et al. (2023):

    L_DPO(theta) = - E_{(x, y_c, y_r)} log sigmoid( beta * [ log pi_theta(y_c|x) / pi_ref(y_c|x)
                                                           - log pi_theta(y_r|x) / pi_ref(y_r|x) ] )

with sequence log-probs summed over the response tokens (fp32) and pi_ref the frozen starting model.
beta * log pi_theta(y|x) / pi_ref(y|x) is the implicit reward, logged for chosen and rejected responses.
Only the *margin* is optimised: chosen log-probs usually fall too (less than rejected ones), as expected.
With h the log-ratio difference above, conservative DPO (`--label_smoothing eps`) is
L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), and IPO (`--loss_type ipo`, Azar et al.,
2023, Eq. 17) L = (h - 1 / (2 beta))^2, on summed log-probs as in the paper (TRL divides by the length).

The reference log-probs are computed once before training (the reference model is then freed); chosen
and rejected run in one concatenated forward pass. Real checkpoints: dropout is off in the policy
(`--dropout` keeps it), so the first implicit rewards are exactly 0; a response ends at its first stop
token (the tokenizer's EOS or any `eos_token_id` of the generation config), where the end-of-run samples,
drawn from softmax(logits / T) whatever the checkpoint's sampling settings, are scored.

    python dpo.py                                           # the toy: toy/sft -> an aligned policy
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \
        --learning_rate 5e-7 --batch_size 8 --reward_model none
    torchrun --nproc_per_node 4 dpo.py --batch_size 2 ...   # 4 GPUs, global batch 8 (docs/many-gpus.md)
"""

import gc
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
import torch.nn.functional as F
import tyro
from tqdm import tqdm


@dataclass
class Args:
    """DPO: train a policy on preference pairs (prompt, chosen, rejected) to prefer the chosen response,
    with a KL strength beta to the starting model and no reward model; then sample held-out prompts and
    score them. The defaults align the toy's pi_sft in a few minutes on a CPU.

    Example: python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized
    --learning_rate 5e-7 --batch_size 8 --reward_model none"""

    # data
    dataset: str = "toy/data/prefs"
    """hub name, local directory of {split}.jsonl files, or one .jsonl file; rows hold `chosen` and
    `rejected` (and usually `prompt`), as strings or message lists"""
    train_split: str = "train[:4096]"
    """split to train on; datasets' slicing syntax selects part of one (the toy's default: a third)"""
    eval_split: Optional[str] = "test"
    """split for the implicit-reward metrics, at the end and every --eval_every steps (None: skip); for one
    .jsonl file, slices of its one split: --train_split 'train[:95%]' --eval_split 'train[95%:]'"""
    max_length: int = 1024
    """prompt + response tokens kept per sequence; longer responses are cut from the right"""
    max_train_samples: Optional[int] = None
    """train on the first N pairs only (None: all)"""
    max_eval_samples: Optional[int] = None
    """evaluate on the first N pairs only (None: all)"""

    # model
    model: str = "toy/sft"
    """hub id or local directory of the starting policy"""
    ref: Optional[str] = None
    """reference model (default: the starting policy)"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% slower"""
    dropout: bool = False
    """keep the checkpoint's dropout while training (default: off, so the first implicit rewards are 0)"""

    # method
    beta: float = 0.1
    """KL strength: the implicit reward is beta * log(pi / pi_ref)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO (Tulu 2.5 Eq. 3); ipo: IPO (Azar et al. 2023)"""
    label_smoothing: float = 0.0
    """conservative DPO: the probability that a preference label is flipped (sigmoid loss only)"""

    # optimisation (Tulu 2.5 App. F.1: 3 epochs, lr 5e-7, 10% warmup, linear decay; scaled for the toy)
    num_epochs: int = 1
    """passes over the training pairs"""
    max_steps: Optional[int] = None
    """stop after this many optimiser steps (overrides num_epochs)"""
    batch_size: int = 16
    """pairs per forward pass (2 * batch_size sequences; per process under torchrun)"""
    gradient_accumulation_steps: int = 1
    """forward passes per optimiser step"""
    learning_rate: float = 1e-4
    """peak learning rate (1e-4 suits the toy; Tulu 2.5 uses 5e-7 for 7B-70B models)"""
    warmup_ratio: float = 0.1
    """fraction of the steps with linear warmup from 0, then linear decay to 0"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""

    # evaluation by sampling
    reward_model: str = "toy/rm"
    """reward model that scores the end-of-run samples ('none': skip sampling)"""
    eval_prompts: str = "toy/data/prompts"
    """prompt dataset (column `prompt`) for the end-of-run samples"""
    eval_prompts_split: str = "test"
    """its split"""
    num_eval_prompts: Optional[int] = 256
    """sample one response for each of the first N prompts (None: all)"""
    max_prompt_length: int = 1024
    """prompts longer than this many tokens, as the model sees them, are dropped and counted (L_p)"""
    max_new_tokens: int = 256
    """length limit of the sampled responses"""
    temperature: float = 1.0
    """sampling temperature (1.0: the policy itself, so the KL estimate is unbiased)"""
    eval_every: Optional[int] = None
    """also compute the held-out DPO loss and implicit rewards every N optimiser steps (None: at the end)"""
    sample_every: Optional[int] = None
    """also sample and score before training and every N steps, to samples/step_<N>.jsonl (None: end only)"""

    # logging and output
    output_dir: Optional[str] = None
    """where the run goes (default: runs/dpo-<time>); must be empty (or --resume)"""
    log_every: int = 20
    """optimiser steps between log lines"""
    save_every: int = 200
    """optimiser steps between checkpoints (the last one kept) that --resume continues from (0: none)"""
    resume: bool = False
    """continue the unfinished run in --output_dir from its last checkpoint (same arguments)"""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """also send the logged records to a tracker (its package installed: pip install tensorboard, ...)"""
    run_name: Optional[str] = None
    """the run's name in wandb or trackio (default: the output dir's name; TensorBoard uses the folder's)"""
    dry_run: bool = False
    """print one tokenised pair (its loss tokens in [[ ]]) and the counts, and stop before any model loads"""

    # setup
    seed: int = 0
    """seed of the data order and the sampling"""
    device: str = "auto"
    """cuda, cpu, ... (auto: cuda when available)"""
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    """compute dtype: bfloat16 autocasts the forward pass (weights stay fp32); default bf16 on CUDA"""


def check_args(args: Args) -> None:
    """Every argument checked before anything is loaded or written: one line each."""
    problems = [
        (args.max_prompt_length < 1,
         f"--max_prompt_length must be at least 1 (got {args.max_prompt_length})"),
        (args.beta <= 0, f"--beta must be positive (got {args.beta}): at 0 DPO learns nothing, below 0 it "
                         "learns to prefer the rejected responses"),
        (not 0 <= args.label_smoothing < 0.5,
         f"--label_smoothing is the probability that a label is flipped, in [0, 0.5) (got "
         f"{args.label_smoothing}); at 0.5 and above DPO learns nothing or the reverse"),
        (args.loss_type == "ipo" and args.label_smoothing > 0,
         "--label_smoothing applies to the sigmoid loss only; IPO has no label smoothing"),
        (args.temperature <= 0, f"--temperature must be positive (got {args.temperature}); this script "
                                "samples, and its KL estimate needs the sampled distribution"),
        (args.max_new_tokens < 1, f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})"),
        (args.eval_every is not None and (args.eval_every < 1 or not args.eval_split),
         "--eval_every needs a positive number of steps and an --eval_split"),
        (args.sample_every is not None and (args.sample_every < 1 or args.reward_model.lower() == "none"),
         "--sample_every needs a positive number of steps and a --reward_model to score the samples"),
        *training_problems(args),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


# ---- The method's maths ---------------------------------------------------------------------------


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple:
    """Per-pair DPO (or IPO) losses and the implicit rewards beta * log(pi / pi_ref).

    All inputs: (B,) sequence log-probs summed over response tokens. Returns (losses, chosen_rewards,
    rejected_rewards), each (B,); the rewards are detached (they are for logging)."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios  # h: the difference of log-ratios
    if loss_type == "sigmoid":  # Tulu 2.5 Eq. 3; conservative DPO flips a label with prob. eps
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    elif loss_type == "ipo":  # IPO, Azar et al. (2023) Eq. 17, with tau = beta
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 128) -> torch.Tensor:
    """Sum of the labelled tokens' log-probs per sequence under softmax(logits / T), in fp32, `chunk`
    positions at a time: no fp32 log-softmax of the whole block (at V = 152k it would outweigh the model).
    logits: (B, K, V); labels: (B, K), -100 where unlabelled; position t predicts token t + 1. (B,)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    total = torch.zeros(labels.shape[0], device=logits.device)
    for t in range(0, labels.shape[1], chunk):
        part, target = logits[:, t : t + chunk].float(), labels[:, t : t + chunk]
        if temperature != 1.0:
            part = part / temperature
        token_logps = part.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) - part.logsumexp(-1)
        total = total + (token_logps * (target != -100)).sum(1)
    return total


# ---- Data: preference pairs, tokenised with response-only labels ----------------------------------


def split_pair(row: dict) -> Optional[tuple]:
    """(prompt, chosen, rejected). Without `prompt` (Anthropic HH-RLHF's rows), the prompt is what the sides
    share: texts are split after the last "\n\nAssistant:" of their common prefix, else before its last
    whitespace (never inside a word; the reply keeps its leading space, as HH's do); message lists after
    their common messages, each side then one assistant message. None when there is no such split."""
    if "prompt" in row:
        return row["prompt"], row["chosen"], row["rejected"]
    chosen, rejected = row["chosen"], row["rejected"]
    shorter, longer = sorted((chosen, rejected), key=len)
    if longer[: len(shorter)] == shorter:
        return None
    if isinstance(chosen, str):
        shared = os.path.commonprefix([chosen, rejected])
        marker = shared.rfind("\n\nAssistant:")
        cut = marker + len("\n\nAssistant:") if marker >= 0 else max(0, *map(shared.rfind, " \n\t"))
    else:
        cut = next(i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r)
        last = {chosen[-1]["role"], rejected[-1]["role"]}
        if cut == 0 or not len(chosen) == len(rejected) == cut + 1 or last != {"assistant"}:  # one reply each
            return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_pairs(data, where: str) -> list:
    """split_pair of every row; the rows without a split are dropped, and counted."""
    splits = [split_pair(row) for row in data]
    kept = [split for split in splits if split]
    if len(kept) < len(splits):
        print(f"note: {where}: dropped {len(splits) - len(kept)} of {len(splits)} pairs with no prompt to "
              "split off (equal sides, one side the other's prefix, or more than one final message)")
    return kept


def build_pairs(data, tokenizer, max_length: int, stop_ids: list, where: str = "the data") -> list:
    """For each row, prompt + chosen and prompt + rejected as token ids with response-only labels. A
    row whose prompt leaves no room for a response within max_length is dropped, and counted."""
    pairs, rows = [], split_pairs(data, where)
    for prompt, chosen, rejected in rows:
        pair = {}
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            prompt_ids, completion_ids = tokenize_example(tokenizer, prompt, completion, max_length, stop_ids)
            pair[side] = {"input_ids": prompt_ids + completion_ids,
                          "labels": [-100] * len(prompt_ids) + completion_ids}
        if completion_ids:  # the prompt is the same for both sides
            pairs.append(pair)
    report_dropped(len(pairs), len(rows) - len(pairs), max_length, where)
    return pairs


def load_pairs(args, tokenizer, stop_ids: list) -> tuple:
    """(train pairs, held-out pairs: [] without an eval split)."""
    needs, where = [("chosen", "rejected")], f"'{args.dataset}'"
    train = build_pairs(load_split(args.dataset, args.train_split, needs, args.max_train_samples),
                        tokenizer, args.max_length, stop_ids, f"{where} {args.train_split}")
    if not args.eval_split:
        return train, []
    return train, build_pairs(load_split(args.dataset, args.eval_split, needs, args.max_eval_samples),
                              tokenizer, args.max_length, stop_ids, f"{where} {args.eval_split}")


def collate_pairs(pairs: list, pad_id: int) -> dict:
    """The chosen sequences, then the rejected ones, as one collate_sequences batch: one forward pass
    for both. Rows [:B] are chosen, rows [B:] rejected."""
    samples = []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            n = pair[side]["labels"].count(-100)  # the prompt's length: the labels are -100 there only
            samples.append((pair[side]["input_ids"][:n], pair[side]["input_ids"][n:]))
    return collate_sequences(samples, pad_id)


def collate_sequences(samples: list, pad_id: int) -> dict:
    """(prompt_ids, response_ids, ...) as one batch with every response starting at the same column
    (prompts left-padded, responses right-padded), so log-probs need only the last R + 1 logits
    (`logits_to_keep`). Positions count from each row's first token: padding changes no number.
    input_ids, attention_mask, position_ids: (B, P + R); labels: (B, R + 1), -100 off the response."""
    # a response with no prompt before it: its first token has no position to be predicted from
    samples = [(p, r) if p else (r[:1], r[1:]) for p, r, *_ in samples]
    P, R = max(len(p) for p, _ in samples), max(len(r) for _, r in samples)
    ids = torch.full((len(samples), P + R), pad_id)
    mask = torch.zeros((len(samples), P + R), dtype=torch.long)
    labels = torch.full((len(samples), R + 1), -100)
    for i, (p, r) in enumerate(samples):
        ids[i, P - len(p) : P + len(r)] = torch.tensor(p + r)
        mask[i, P - len(p) : P + len(r)] = 1
        labels[i, 1 : 1 + len(r)] = torch.tensor(r, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "labels": labels}


# ---- Models: log-probs, sampling, scoring ---------------------------------------------------------


def batch_logps(model, batch: dict, autocast, temperature: float = 1.0) -> torch.Tensor:
    """Summed response log-probs of each row of a collate_sequences batch under logits / T (what
    sampling at T draws from), the LM head run only where a response token is predicted. (B,), fp32."""
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=batch["labels"].shape[1]).logits
    return sequence_logps(logits, batch["labels"], temperature)


@torch.no_grad()
def add_ref_logps(ref_model, pairs: list, batch_size: int, pad_id: int, device, autocast) -> None:
    """Stores every pair's reference log-probs in it (`ref_chosen_logps`, `ref_rejected_logps`)."""
    ref_model.eval()
    for i in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", disable=rank() > 0 or None):
        chunk = pairs[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        chosen, rejected = batch_logps(ref_model, batch, autocast).chunk(2)
        for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            p["ref_chosen_logps"], p["ref_rejected_logps"] = c, r


def pair_losses(policy, pairs: list, args, pad_id: int, device, autocast) -> tuple:
    """DPO on a micro-batch of pairs with stored reference log-probs: (the per-pair losses (B,), the DPO
    literature's metrics summed over the pairs, the batch's token count)."""
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
    ref_chosen_logps, ref_rejected_logps = (torch.tensor([p[k] for p in pairs], device=device)
                                            for k in ("ref_chosen_logps", "ref_rejected_logps"))
    # one forward pass for chosen and rejected: rows [:B] and [B:] of the batch
    policy_chosen_logps, policy_rejected_logps = batch_logps(policy, batch, autocast).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(  # Tulu 2.5 Eq. 3, per pair
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, args.beta,
        args.label_smoothing, args.loss_type)
    sums = {"train/loss": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
            "rewards/margin": chosen_rewards - rejected_rewards,
            "logps/chosen": policy_chosen_logps, "logps/rejected": policy_rejected_logps}
    return losses, {k: v.detach().sum().item() for k, v in sums.items()}, batch["attention_mask"].sum().item()


@torch.no_grad()
def evaluate_pairs(policy, pairs: list, args, pad_id: int, device, autocast) -> dict:
    """DPO loss and implicit-reward metrics on held-out pairs."""
    policy.eval()
    totals = {}
    for i in range(0, len(pairs), 2 * args.batch_size):
        chunk = pairs[i : i + 2 * args.batch_size]
        tally(totals, pair_losses(policy, chunk, args, pad_id, device, autocast)[1], len(chunk))
    policy.train()
    return {f"eval/{k.replace('train/', '')}": v for k, v in means(totals).items()}


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
def sample_responses(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float,
                     batch_size: int, device, stop_ids: list) -> list:
    """One response per prompt sampled from softmax(logits / T) (KV cache, left-padded batches):
    (prompt_ids, response_ids cut after the first stop id, finished: False if max_new_tokens hit first)."""
    tokenizer.padding_side = "left"
    model.eval()
    results = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        texts = [format_prompt(tokenizer, p) for p in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True,
                          add_special_tokens=not isinstance(chunk[0], list)).to(device)
        out = generate(model, batch, temperature, max_new_tokens, tokenizer.pad_token_id, stop_ids)
        for row, mask, generated in zip(batch["input_ids"], batch["attention_mask"],
                                        out[:, batch["input_ids"].shape[1] :].tolist()):
            ends = [t for t, token in enumerate(generated) if token in stop_ids]
            results.append((row[mask.bool()].tolist(), generated[: ends[0] + 1] if ends else generated,
                            bool(ends)))
    return results


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token, with left or right padding. (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(1)


def score(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each sequence: the score head at its last attended token (the EOS after the response).
    The index comes from the attention mask, never pad_token_id: transformers' own pooling reads the last
    non-pad token, which with pad == eos is the token before the EOS. (B, T) -> (B,), fp32."""
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=positions).last_hidden_state
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return model.score(last).squeeze(-1).float()


@torch.no_grad()
def evaluate_samples(policy, ref_model, reward_model, tokenizer, prompts: list, args, device,
                     autocast, stop_ids: list, path: Path) -> dict:
    """Samples the policy at args.temperature (the same prompts and seed at every call, the caller's
    random state untouched), writes the samples to `path`, and returns the reward model's mean score and
    the mean of log pi_T(y|x) - log pi_ref,T(y|x) (both from logits / T): KL(pi_T || pi_ref,T)."""
    training, batch_size = policy.training, 4 * args.batch_size
    with torch.random.fork_rng(), autocast:  # sampled in the precision its log-probs are taken in
        torch.manual_seed(args.seed)
        samples = sample_responses(policy, tokenizer, prompts, args.max_new_tokens, args.temperature,
                                   batch_size, device, stop_ids)
    rows = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate_sequences(chunk, tokenizer.pad_token_id).items()}
        logratios = (batch_logps(policy, batch, autocast, args.temperature)
                     - batch_logps(ref_model, batch, autocast, args.temperature))
        with autocast:
            scores = score(reward_model, batch["input_ids"], batch["attention_mask"])
        for (p, r, finished), s, lr in zip(chunk, scores.tolist(), logratios.tolist()):
            rows.append({"response": tokenizer.decode(r, skip_special_tokens=True), "score": s,
                         "logratio": lr, "length": len(r), "finished": finished})
    policy.train(training)
    write_jsonl(path, [{"prompt": p, **r} for p, r in zip(prompts, rows)])
    n, scores = len(rows), torch.tensor([r["score"] for r in rows])
    return {"eval/score": scores.mean().item(), "eval/score_se": (scores.std() / math.sqrt(n)).item(),
            **{f"eval/{k}": sum(r[key] for r in rows) / n
               for k, key in (("kl", "logratio"), ("length", "length"), ("eos_rate", "finished"))}}


# ---- Training -------------------------------------------------------------------------------------


def main(args: Args) -> dict:
    # set-up: every argument, the output dir and every tokenizer checked before any model loads
    check_args(args)
    device, dtype, autocast = setup(args)
    ref_name, use_rm = args.ref or args.model, args.reward_model.lower() != "none"
    others = [ref_name] + ([args.reward_model] if use_rm else [])
    out = None if args.dry_run else check_output_dir(args, "dpo", [args.model, *others])
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    stop_ids, pad_id = stop_token_ids(tokenizer, args.model), tokenizer.pad_token_id
    check_tokenizers(tokenizer, args.model, others, args.trust_remote_code)
    if use_rm:  # the reward model is loaded only to score samples, but checked now
        check_architecture(args.reward_model, args.trust_remote_code, "ForSequenceClassification")
        prompts = load_split(args.eval_prompts, args.eval_prompts_split, [("prompt",)],
                             args.num_eval_prompts)["prompt"]
        prompts = drop_long_prompts(prompts, tokenizer, args.max_prompt_length, f"'{args.eval_prompts}'")
    train, evals = load_pairs(args, tokenizer, stop_ids)
    total_steps = count_steps(len(train), args)
    if args.dry_run:  # one tokenised pair and the counts, before any model loads
        for side in ("chosen", "rejected"):
            print(f"{side + ':':10}" + show_example(tokenizer, **train[0][side]))
        print(f"dry run: {len(train)} train / {len(evals)} eval pairs, {total_steps} optimiser steps of "
              f"{args.batch_size * args.gradient_accumulation_steps} pairs; no model loaded, nothing written")
        return {"train/pairs": len(train), "eval/pairs": len(evals), "train/steps": total_steps}

    # models: the policy trains; the frozen reference's log-probs are computed once, here
    policy = place(load_model(args.model, args.trust_remote_code), device)
    if not args.dropout:
        disable_dropout(policy)
    ref_model = place(load_model(ref_name, args.trust_remote_code), device, frozen=True)
    start = time.time()
    add_ref_logps(ref_model, train + evals, 2 * args.batch_size, pad_id, device, autocast)
    print(f"reference log-probs in {time.time() - start:.1f}s")
    reward_model = None
    if use_rm and args.sample_every:  # samples scored during training: the reference and reward model stay
        reward_model = place(load_model(args.reward_model, args.trust_remote_code, scalar=True), device,
                             frozen=True)
    else:  # the reference's memory is freed for training
        ref_model = None
        gc.collect()
    optimizer, scheduler = start_training([policy], args, total_steps, "linear")
    start_step, progress = 0, {"time": 0.0, "tokens": 0, "window": {}}
    if args.resume and last_checkpoint(out):  # weights, optimiser, schedule, data position, random states
        start_step, progress = restore(last_checkpoint(out), [policy], optimizer, scheduler)
    create_output_dir(out, args, device, dtype, resume_step=start_step if args.resume else None)
    tracker = Tracker(args, out, start_step)
    print(f"dpo: {len(train)} train / {len(evals)} eval pairs, {total_steps} steps, beta {args.beta}, "
          f"{args.loss_type} loss, device {device}, {dtype}")

    # the loop: DPO on each micro-batch of pairs, one optimiser step per gradient_accumulation_steps
    stream = micro_batches(train, args, skip=start_step * args.gradient_accumulation_steps)
    window = progress["window"]
    if reward_model and start_step == 0:  # --sample_every: the starting point too
        metrics = evaluate_samples(policy, ref_model, reward_model, tokenizer, prompts, args, device,
                                   autocast, stop_ids, out / "samples" / "step_000000.jsonl")
        log(out, {"step": 0, **metrics}, tracker)
    for step in tqdm(range(start_step + 1, total_steps + 1), desc="dpo", disable=rank() > 0 or None):
        step_start = time.time()
        micro = [next(stream) for _ in range(args.gradient_accumulation_steps)]
        n_pairs = summed([sum(len(pairs) for pairs in micro)])[0] / world_size()
        for pairs in micro:
            losses, sums, tokens = pair_losses(policy, pairs, args, pad_id, device, autocast)
            (losses.sum() / n_pairs).backward()  # the mean over the optimiser step's pairs
            tally(window, sums, len(pairs))
            progress["tokens"] += tokens
        grad_norm = optimizer_step(optimizer, scheduler, args.max_grad_norm, window["train/loss"],
                                   f"at step {step}")
        progress["time"] += time.time() - step_start

        if step % args.log_every == 0 or step == total_steps:
            log(out, train_record(step, window, grad_norm, scheduler, progress), tracker)
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:  # --eval_every
            log(out, {"step": step, **evaluate_pairs(policy, evals, args, pad_id, device, autocast)}, tracker)
        if reward_model and step % args.sample_every == 0 and step < total_steps:  # --sample_every
            metrics = evaluate_samples(policy, ref_model, reward_model, tokenizer, prompts, args, device,
                                       autocast, stop_ids, out / "samples" / f"step_{step:06d}.jsonl")
            log(out, {"step": step, **metrics}, tracker)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            save_checkpoint([policy], optimizer, scheduler, out, step, progress)
    save_model(policy, tokenizer, out)

    # evaluation: implicit rewards on held-out pairs, then samples scored by the reward model
    results = {"train/steps": total_steps, "train/runtime_s": round(progress["time"], 1),
               "perf/tokens_per_s": round(progress["tokens"] / max(progress["time"], 1e-9), 1)}
    if evals:
        results.update(evaluate_pairs(policy, evals, args, pad_id, device, autocast))
    if use_rm:
        ref_model = ref_model or place(load_model(ref_name, args.trust_remote_code), device, frozen=True)
        reward_model = reward_model or place(load_model(args.reward_model, args.trust_remote_code,
                                                        scalar=True), device, frozen=True)
        results.update(evaluate_samples(policy, ref_model, reward_model, tokenizer, prompts, args, device,
                                        autocast, stop_ids, out / "samples.jsonl"))
    return finish(out, results, tracker)


# ---- Plumbing --------------------------------------------------------------------------------------
# The same text in every script that uses it (tests/test_twins.py): arguments, data files, tokenizers,
# loading models, many processes, the run's folder, logs and checkpoints. Safe to skip on a first reading.


def training_problems(args) -> list:
    """The checks every trainer shares, as (is_bad, message) pairs for check_args."""
    counts = ["num_epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "log_every"]
    return [(getattr(args, n) is not None and getattr(args, n) < 1,
             f"--{n} must be at least 1 (got {getattr(args, n)})") for n in counts] + [
        (args.learning_rate <= 0, f"--learning_rate must be positive (got {args.learning_rate})"),
        (not 0 <= args.warmup_ratio < 1, f"--warmup_ratio must be in [0, 1) (got {args.warmup_ratio})"),
        (args.max_grad_norm <= 0, f"--max_grad_norm must be positive (got {args.max_grad_norm})"),
        (args.max_length < 2, f"--max_length must fit a prompt and a response (got {args.max_length})"),
        (args.save_every < 0, f"--save_every must be 0 (no checkpoints) or more (got {args.save_every})"),
        (args.resume and not args.output_dir, "--resume needs the --output_dir of the run to continue"),
        (args.report_to != "none" and not importlib.util.find_spec(args.report_to),
         f"--report_to {args.report_to} needs its package, not installed here: pip install {args.report_to}"),
    ]


def count_steps(n_rows: int, args) -> int:
    """Optimiser steps of the run: --max_steps, else the epochs' micro-batches over the accumulation."""
    world, accumulation = world_size(), args.gradient_accumulation_steps
    if world > 1:  # under torchrun --batch_size is per process
        print(f"global batch: --batch_size {args.batch_size} x {world} processes x "
              f"--gradient_accumulation_steps {accumulation} = {args.batch_size * world * accumulation}")
    micro = args.num_epochs * math.ceil(n_rows / (args.batch_size * world))
    if not args.max_steps and micro < accumulation:
        raise SystemExit(f"error: {n_rows} training rows make {micro} micro-batches of --batch_size "
                         f"{args.batch_size} x {world} process(es) in {args.num_epochs} epoch(s), fewer than "
                         f"one optimiser step of --gradient_accumulation_steps {accumulation}: lower it, or "
                         "set --max_steps")
    return args.max_steps or micro // accumulation


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup from 0, then linear or cosine decay to `floor`, or constant."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


def micro_batches(rows: list, args, skip: int):
    """Endless shuffled micro-batches, epoch after epoch (same order per seed), after `skip` done ones."""
    me, world, g, n = rank(), world_size(), torch.Generator().manual_seed(args.seed), 0
    size = args.batch_size * world
    while True:
        order = torch.randperm(len(rows), generator=g).tolist()
        for i in range(0, len(order), size):
            n += 1
            if n > skip:
                batch = order[i : i + size]
                # under torchrun every N-th row of the same global batch (a short last one: its last row)
                yield [rows[j] for j in batch[me::world] or batch[-1:]]


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


def report_dropped(kept: int, dropped: int, max_length: int, where: str) -> None:
    """Rows whose prompt leaves no room for a response token carry no loss: dropped, and said."""
    if dropped:
        print(f"note: {where}: dropped {dropped} of {kept + dropped} rows whose prompt fills --max_length "
              f"{max_length} (no response token left)")
    if not kept:
        raise SystemExit(f"error: {where}: every prompt fills --max_length {max_length}; raise it")


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


def tokenize_example(tokenizer, prompt, completion, max_length: int, stop_ids: list) -> tuple:
    """(prompt_ids, completion_ids), apart so the response mask is exact; the response ends at a stop id."""
    templated = not isinstance(prompt, str)
    prompt_text, completion_text = prompt, completion
    if templated:
        prompt_text = format_prompt(tokenizer, prompt)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise SystemExit("error: the chat template does not render the prompt as a prefix of the full "
                             "conversation, so the response cannot be located:\n"
                             f"{prompt_text!r}\n{full_text!r}")
        completion_text = full_text[len(prompt_text):]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    ends = [t for t, token in enumerate(completion_ids) if token in stop_ids]
    completion_ids = completion_ids[: ends[0] + 1] if ends else completion_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids[: max(0, max_length - len(prompt_ids))]


def show_example(tokenizer, input_ids: list, labels: list) -> str:
    """A tokenised sequence as text, the tokens that carry the loss between [[ and ]] (for --dry_run)."""
    n = next((t for t, label in enumerate(labels) if label != -100), len(labels))
    prompt, response = tokenizer.decode(input_ids[:n]), tokenizer.decode(input_ids[n:])
    return f"{prompt}[[{response}]]  ({len(input_ids)} tokens, {len(input_ids) - n} in [[ ]])"


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


def train_record(step: int, window: dict, grad_norm: float, scheduler, progress: dict) -> dict:
    """A log step's record: the window's means, the last gradient norm, the learning rate, throughput."""
    return {"step": step, **means(window), "train/grad_norm": grad_norm,
            "train/lr": scheduler.get_last_lr()[0],
            "perf/tokens_per_s": progress["tokens"] / progress["time"]}


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
