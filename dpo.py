"""Direct preference optimisation (DPO): preference learning without a reward model or sampling.

Tulu 2.5 (Ivison et al., 2024) Eq. 3; DeRa (Liu et al., 2024) Appendix C; Rafailov et al. (2023):

    L_DPO(theta) = - E_{(x, y_c, y_r)} log sigmoid( beta * [ log pi_theta(y_c|x) / pi_ref(y_c|x)
                                                           - log pi_theta(y_r|x) / pi_ref(y_r|x) ] )

with sequence log-probs summed over the response tokens (fp32) and pi_ref the frozen starting model.
beta * log pi_theta(y|x) / pi_ref(y|x) is the policy's implicit reward; the logs report it for chosen
and rejected responses. Only the *margin* is optimised: chosen log-probs usually fall too (just less
than rejected ones), which is expected, not a bug.

Two variants are one line each:
- conservative DPO (`--label_smoothing eps`): each label is flipped with probability eps,
  L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), h the log-ratio difference above;
- IPO (`--loss_type ipo`, Azar et al., 2023, Eq. 17, named by DeRa as an alternative):
  L = (h - 1 / (2 beta))^2, on summed log-probs as in the paper (TRL divides by the length instead).

The reference log-probs are computed once over the dataset before training (default), which frees the
reference model's memory during training; `--no-precompute_ref` computes them per batch instead (same
numbers). Chosen and rejected run in one concatenated forward pass.

Real checkpoints: dropout is off in the policy by default (`--dropout` keeps it), so that before the
first update the policy is the reference and the implicit rewards are exactly 0. A response ends at
its first stop token (the tokenizer's EOS or any `eos_token_id` of the checkpoint's generation
config); the end-of-run samples are drawn from softmax(logits / T) with a generation config built
from the arguments (never the checkpoint's sampling settings), and scored at that stop token.

    python dpo.py                                           # the toy: toy/sft -> an aligned policy
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \
        --learning_rate 5e-7 --batch_size 8 --reward_model none
"""

import gc
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm


@dataclass
class Args:
    # data
    dataset: str = "toy/data/prefs"
    """hub name, local directory of {split}.jsonl files, or one .jsonl file; rows hold `chosen` and
    `rejected` (and usually `prompt`), as strings or message lists"""
    train_split: str = "train[:4096]"
    """split to train on; datasets' slicing syntax selects part of one (the toy's default: a third)"""
    eval_split: Optional[str] = "test"
    """split for the end-of-run implicit-reward metrics (None: skip)"""
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
    """keep the checkpoint's dropout while training (default: off, so that the policy in train mode is
    the model the reference log-probs describe and the first implicit rewards are exactly 0)"""

    # method
    beta: float = 0.1
    """KL strength: the implicit reward is beta * log(pi / pi_ref)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO (Tulu 2.5 Eq. 3); ipo: IPO (Azar et al. 2023)"""
    label_smoothing: float = 0.0
    """conservative DPO: the probability that a preference label is flipped (sigmoid loss only)"""
    precompute_ref: bool = True
    """compute reference log-probs once before training and free the reference model"""

    # optimisation (Tulu 2.5 App. F.1: 3 epochs, lr 5e-7, 10% warmup, linear decay; scaled for the toy)
    num_epochs: int = 1
    """passes over the training pairs"""
    max_steps: Optional[int] = None
    """stop after this many optimiser steps (overrides num_epochs)"""
    batch_size: int = 16
    """pairs per forward pass (2 * batch_size sequences)"""
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
    max_new_tokens: int = 256
    """length limit of the sampled responses"""
    temperature: float = 1.0
    """sampling temperature (1.0: the policy itself, so the KL estimate is unbiased)"""
    sample_every: Optional[int] = None
    """also sample and score before training and every N optimiser steps, to follow the score and KL
    over training (None: only at the end); the samples go to samples/step_<N>.jsonl"""

    # logging and output
    output_dir: Optional[str] = None
    """where the run goes (default: runs/dpo-<time>); must be empty unless --overwrite"""
    overwrite: bool = False
    """replace the contents of an existing, non-empty output_dir"""
    log_every: int = 20
    """optimiser steps between log lines"""

    # setup
    seed: int = 0
    """seed of the data order and the sampling"""
    device: str = "auto"
    """cuda, cpu, ... (auto: cuda when available)"""
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    """compute dtype: bfloat16 autocasts the forward pass (weights stay fp32); default bf16 on CUDA"""


# ---------------------------------------------------------------------------------------------------
# The method's maths
# ---------------------------------------------------------------------------------------------------
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


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probs of the labelled tokens of each sequence, from fp32 logits.

    logits: (B, T, V); labels: (B, T) with -100 on prompt and padding. Returns (B,)."""
    labels = labels[:, 1:]  # position t predicts token t + 1
    mask = labels != -100
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logprobs = torch.gather(logprobs, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (token_logprobs * mask).sum(-1)


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup from 0, then linear or cosine decay to `floor`."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def resolve(path: str) -> str:
    """A relative path that is not under the working directory but is next to this script (the toy
    defaults) resolves there, so `python ~/minialign/sft.py` works from any folder."""
    here = Path(__file__).resolve().parent / path
    return str(here) if not Path(path).exists() and here.exists() else path


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".json", ".jsonl"))


def load_split(name: str, split: str, needs: list):
    """One split of a hub dataset, a local directory of {split}.jsonl files, or a .jsonl file.
    `needs` lists alternatives: each a tuple of columns that together suffice."""
    from datasets import load_dataset

    path = resolve(name)
    if looks_local(path) and not Path(path).exists():
        raise SystemExit(f"error: dataset '{name}' not found: no such file or directory")
    try:
        if path.endswith((".json", ".jsonl")):
            data = load_dataset("json", data_files=path, split="train")
        else:
            data = load_dataset(path, split=split)
    except Exception as e:  # datasets raises many types; all mean the same to a user
        raise SystemExit(f"error: could not load split '{split}' of dataset '{name}': {e}")
    if not any(set(cols) <= set(data.column_names) for cols in needs):
        wanted = " or ".join("+".join(cols) for cols in needs)
        raise SystemExit(f"error: dataset '{name}' ({split}) has columns {data.column_names}; "
                         f"it needs {wanted}")
    return data


# Used only for a tokenizer without a chat template; documented in the README.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def load_tokenizer(name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SystemExit(f"error: could not load the tokenizer of '{name}' (offline, or a wrong name?): {e}")
    if tokenizer.pad_token is None:
        print(f"note: the tokenizer of '{name}' has no pad token; using its EOS token for padding "
              "(padding is masked everywhere, so this changes no result)")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        print(f"note: the tokenizer of '{name}' has no chat template; conversations are formatted as "
              "'role: content<eos>' lines (PLAIN_CHAT_TEMPLATE)")
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def check_same_tokenizer(tokenizer, other, name: str) -> None:
    """Models that exchange token ids must share vocabulary and chat template, or scores are noise."""
    if other.get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"error: '{name}' has a different vocabulary than the policy "
                         f"({len(other)} vs {len(tokenizer)} tokens); use models with the same tokenizer")
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


def format_example(tokenizer, prompt, completion) -> tuple:
    """(prompt_text, completion_text, templated): the response is what the template adds after the
    prompt, so it carries the template's end-of-turn token (and whatever the template writes after it,
    which tokenize_example cuts off)."""
    if isinstance(prompt, str):
        return prompt, completion, False
    prompt_text = format_prompt(tokenizer, prompt)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise SystemExit("error: the chat template does not render the prompt as a prefix of the full "
                         f"conversation, so the response cannot be located:\n{prompt_text!r}\n{full_text!r}")
    return prompt_text, full_text[len(prompt_text):], True


def tokenize_example(tokenizer, prompt, completion, max_length: int, stop_ids: list,
                     check: bool = False) -> tuple:
    """(prompt_ids, completion_ids). The response is what the policy emits: its tokens up to and
    including the first stop id. Template text after the end-of-turn token (ChatML's newline after
    <|im_end|>) is not part of it; a response with no stop id gets the tokenizer's EOS. Prompt and
    response are tokenised apart and concatenated, so the response mask is exact; `check` warns when
    that differs from tokenising the joined text (a BPE merge across the boundary, or special tokens
    added twice): the model is then trained on a tokenisation that it would not see at inference."""
    prompt_text, completion_text, templated = format_example(tokenizer, prompt, completion)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    ends = [t for t, token in enumerate(completion_ids) if token in stop_ids]
    completion_ids = completion_ids[: ends[0] + 1] if ends else completion_ids + [tokenizer.eos_token_id]
    if check:
        joined = tokenizer(prompt_text + completion_text, add_special_tokens=not templated)["input_ids"]
        apart = prompt_ids + completion_ids
        n = min(len(joined), len(apart))  # the joined text may go on past the stop; apart may add EOS
        if joined[:n] != apart[:n]:
            print(f"warning: prompt and response tokenise differently apart than together:\n"
                  f"  apart:    {apart}\n  together: {joined}")
    return prompt_ids, completion_ids[: max(0, max_length - len(prompt_ids))]


def split_pair(row: dict) -> tuple:
    """(prompt, chosen, rejected). Without a `prompt` column, chosen and rejected are whole
    conversations (the last message is the response) or whole texts (empty prompt)."""
    if "prompt" in row:
        return row["prompt"], row["chosen"], row["rejected"]
    if isinstance(row["chosen"], str):
        return "", row["chosen"], row["rejected"]
    return row["chosen"][:-1], row["chosen"][-1:], row["rejected"][-1:]


def build_pairs(data, tokenizer, max_length: int, stop_ids: list) -> list:
    """For each row, prompt + chosen and prompt + rejected as token ids with response-only labels."""
    pairs = []
    for i, row in enumerate(data):
        prompt, chosen, rejected = split_pair(row)
        pair = {}
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            prompt_ids, completion_ids = tokenize_example(tokenizer, prompt, completion, max_length, stop_ids,
                                                          check=(i == 0))
            pair[side] = {"input_ids": prompt_ids + completion_ids,
                          "labels": [-100] * len(prompt_ids) + completion_ids}
        pairs.append(pair)
    return pairs


def collate_pairs(pairs: list, pad_id: int) -> dict:
    """The chosen sequences, then the rejected ones, right-padded to the longest of all: one forward
    pass for both. Shape: (2B, T); rows [:B] are chosen, rows [B:] rejected."""
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    T = max(len(s["input_ids"]) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    labels = torch.full((len(seqs), T), -100)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------
# Models: log-probs, sampling, scoring
# ---------------------------------------------------------------------------------------------------
def load_model(name: str, trust_remote_code: bool, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SystemExit(f"error: could not load model '{name}' (offline, or a wrong name?): {e}")


def load_scalar_model(name: str, pad_token_id: int, trust_remote_code: bool, dtype=torch.float32):
    """A reward (or value) model: AutoModelForSequenceClassification with one output. A config without
    pad_token_id gets the tokenizer's (transformers refuses padded batches without one); `score`
    reads the reward at the index the attention mask gives, whatever the pad id."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve(name), num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SystemExit(f"error: could not load reward model '{name}' (offline, or a wrong name?): {e}")
    if model.config.pad_token_id is None:
        print(f"note: the config of '{name}' has no pad_token_id; using the tokenizer's ({pad_token_id})")
        model.config.pad_token_id = pad_token_id
    return model


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


def batch_logps(model, batch: dict, autocast, temperature: float = 1.0) -> torch.Tensor:
    """Summed response log-probs of each sequence of a collated batch (B rows: for pairs, chosen then
    rejected), under logits / temperature, the distribution that sampling at that temperature draws
    from. Returns (B,) in fp32."""
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits.float() / temperature, batch["labels"])


@torch.no_grad()
def add_ref_logps(ref_model, pairs: list, batch_size: int, pad_id: int, device, autocast) -> None:
    """Stores each pair's reference log-probs in it (`ref_chosen_logps`, `ref_rejected_logps`)."""
    ref_model.eval()
    for i in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", leave=False, disable=None):
        chunk = pairs[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        chosen, rejected = batch_logps(ref_model, batch, autocast).chunk(2)
        for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            p["ref_chosen_logps"], p["ref_rejected_logps"] = c, r


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
    try:
        return model.generate(**batch, generation_config=config)
    finally:
        model.generation_config = checkpoint_config


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float,
                     batch_size: int, device, stop_ids: list) -> list:
    """One response per prompt, sampled from softmax(logits / T) (no top-k, no top-p) with the KV cache,
    left-padded batches. Returns (prompt_ids, response_ids, finished) per prompt: the response is cut
    after its first stop id (which it keeps); `finished` is False when it hit max_new_tokens first."""
    tokenizer.padding_side = "left"
    model.eval()
    config = sampling_config(temperature, max_new_tokens, tokenizer.pad_token_id, stop_ids)
    results = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        texts = [format_prompt(tokenizer, p) for p in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True,
                          add_special_tokens=not isinstance(chunk[0], list)).to(device)
        out = generate(model, batch, config)
        for row, mask, generated in zip(batch["input_ids"], batch["attention_mask"],
                                        out[:, batch["input_ids"].shape[1] :].tolist()):
            ends = [t for t, token in enumerate(generated) if token in stop_ids]
            results.append((row[mask.bool()].tolist(), generated[: ends[0] + 1] if ends else generated,
                            bool(ends)))
    return results


def collate_sequences(samples: list, pad_id: int) -> dict:
    """Prompt + response ids, right-padded, labels on the response only. Shape: (B, T)."""
    T = max(len(p) + len(r) for p, r, _ in samples)
    ids = torch.full((len(samples), T), pad_id)
    labels = torch.full((len(samples), T), -100)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    for i, (p, r, _) in enumerate(samples):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        mask[i, : len(p) + len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token, with left or right padding. (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(1)


def score(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each sequence: the score head at its last attended token, the EOS that ends
    prompt + response. The index comes from the attention mask, never from pad_token_id:
    transformers' own pooling reads the last token that is not pad, which with pad == eos (common in
    chat checkpoints) is the token before the EOS. Positions count from the first attended token, so
    left and right padding give the same score. input_ids, attention_mask: (B, T). Returns (B,), fp32."""
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=positions).last_hidden_state
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return model.score(last).squeeze(-1).float()


@torch.no_grad()
def evaluate_samples(policy, ref_model, reward_model, tokenizer, prompts: list, args, device,
                     autocast, stop_ids: list) -> tuple:
    """Samples the policy at args.temperature, then scores each response with the reward model and
    measures log pi_T(y|x) - log pi_ref,T(y|x) (both from logits / T), whose mean over samples
    estimates KL(pi_T || pi_ref,T): the KL of what was sampled (at T = 1, of the models themselves)."""
    samples = sample_responses(policy, tokenizer, prompts, args.max_new_tokens, args.temperature,
                               4 * args.batch_size, device, stop_ids)
    rows = []
    for i in range(0, len(samples), 4 * args.batch_size):
        chunk = samples[i : i + 4 * args.batch_size]
        batch = {k: v.to(device) for k, v in collate_sequences(chunk, tokenizer.pad_token_id).items()}
        logratios = (batch_logps(policy, batch, autocast, args.temperature)
                     - batch_logps(ref_model, batch, autocast, args.temperature))
        with autocast:
            scores = score(reward_model, batch["input_ids"], batch["attention_mask"])
        for (p, r, finished), s, lr in zip(chunk, scores.tolist(), logratios.tolist()):
            rows.append({"response": tokenizer.decode(r, skip_special_tokens=True), "score": s,
                         "logratio": lr, "length": len(r), "finished": finished})
    n = len(rows)
    scores = torch.tensor([r["score"] for r in rows])
    metrics = {"eval/score": scores.mean().item(), "eval/score_se": (scores.std() / math.sqrt(n)).item(),
               "eval/kl": sum(r["logratio"] for r in rows) / n,
               "eval/length": sum(r["length"] for r in rows) / n,
               "eval/eos_rate": sum(r["finished"] for r in rows) / n}
    return metrics, [{"prompt": p, **r} for p, r in zip(prompts, rows)]


@torch.no_grad()
def evaluate_pairs(policy, pairs: list, args, pad_id: int, device, autocast) -> dict:
    """DPO loss and implicit-reward metrics on held-out pairs (reference log-probs already stored)."""
    policy.eval()
    totals = {}
    for i in range(0, len(pairs), 2 * args.batch_size):
        chunk = pairs[i : i + 2 * args.batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        chosen, rejected = batch_logps(policy, batch, autocast).chunk(2)
        for k, v in pair_metrics(chunk, chosen, rejected, args).items():
            totals[k] = totals.get(k, 0.0) + v.sum().item()
    policy.train()
    return {f"eval/{k.replace('train/', '')}": v / len(pairs) for k, v in totals.items()}


def pair_metrics(chunk: list, chosen: torch.Tensor, rejected: torch.Tensor, args) -> dict:
    """Per-pair loss and the DPO literature's metrics, each (B,)."""
    ref_chosen = torch.tensor([p["ref_chosen_logps"] for p in chunk], device=chosen.device)
    ref_rejected = torch.tensor([p["ref_rejected_logps"] for p in chunk], device=chosen.device)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta,
                                                        args.label_smoothing, args.loss_type)
    return {"train/loss": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
            "rewards/margin": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}


def check_output_dir(output_dir: Optional[str], script: str, overwrite: bool, models: list) -> Path:
    """Fails before any work if the run would overwrite a previous one; writes nothing."""
    out = Path(output_dir or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
    if any(Path(resolve(m)).resolve() == out.resolve() for m in models):
        raise SystemExit(f"error: output_dir '{out}' holds a model this run reads; choose another")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"error: output_dir '{out}' already holds a run ({len(list(out.iterdir()))} "
                         "entries); pass --overwrite to replace it, or choose another --output_dir")
    return out


def create_output_dir(out: Path, args) -> None:
    """Called once the inputs have loaded: empties an --overwrite'n dir, records the arguments."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with open(out / "args.json", "w") as f:
        json.dump(asdict(args), f, indent=2)


def save_model(model, tokenizer, out: Path) -> None:
    """Atomic save: written to a temporary folder, then moved into place, so a crash mid-save never
    leaves a half-written model in `out`."""
    tmp = out / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    # setup
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=(dtype == "bfloat16"))
    ref_name = args.ref or args.model
    use_rm = args.reward_model.lower() != "none"
    if args.sample_every is not None and (args.sample_every < 1 or not use_rm):
        raise SystemExit("error: --sample_every needs a positive number of steps and a --reward_model "
                         "to score the samples")
    out = check_output_dir(args.output_dir, "dpo", args.overwrite,
                           [args.model, ref_name] + ([args.reward_model] if use_rm else []))

    # data, and every tokenizer checked against the policy's before any compute
    needs = [("chosen", "rejected")]
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    stop_ids = stop_token_ids(tokenizer, args.model)
    check_same_tokenizer(tokenizer, load_tokenizer(ref_name, args.trust_remote_code), ref_name)
    if use_rm:
        check_same_tokenizer(tokenizer, load_tokenizer(args.reward_model, args.trust_remote_code),
                             args.reward_model)
        prompts = load_split(args.eval_prompts, args.eval_prompts_split, [("prompt",)])["prompt"]
        prompts = prompts[: args.num_eval_prompts] if args.num_eval_prompts else prompts
    train_data = load_split(args.dataset, args.train_split, needs)
    if args.max_train_samples:
        train_data = train_data.select(range(min(args.max_train_samples, len(train_data))))
    train = build_pairs(train_data, tokenizer, args.max_length, stop_ids)
    evals = []
    if args.eval_split:
        eval_data = load_split(args.dataset, args.eval_split, needs)
        if args.max_eval_samples:
            eval_data = eval_data.select(range(min(args.max_eval_samples, len(eval_data))))
        evals = build_pairs(eval_data, tokenizer, args.max_length, stop_ids)

    # models: the policy trains; the reference is frozen (its log-probs computed once, by default)
    policy = load_model(args.model, args.trust_remote_code).to(device)
    if not args.dropout:
        disable_dropout(policy)
    ref_model = load_model(ref_name, args.trust_remote_code).to(device).eval().requires_grad_(False)
    pad_id = tokenizer.pad_token_id
    if args.precompute_ref:
        start = time.time()
        add_ref_logps(ref_model, train + evals, 2 * args.batch_size, pad_id, device, autocast)
        print(f"reference log-probs of {len(train) + len(evals)} pairs in {time.time() - start:.1f}s")
        if not (use_rm and args.sample_every):  # its memory is free for training
            ref_model = None
            gc.collect()
    else:
        add_ref_logps(ref_model, evals, 2 * args.batch_size, pad_id, device, autocast)
    policy.train()
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        policy.config.use_cache = False
    micro_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = args.max_steps or args.num_epochs * micro_per_epoch // args.gradient_accumulation_steps
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, betas=args.adam_betas,
                                  weight_decay=args.weight_decay)
    warmup = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, "linear"))
    create_output_dir(out, args)
    print(f"dpo: {len(train)} train / {len(evals)} eval pairs, {total_steps} steps, beta {args.beta}, "
          f"{args.loss_type} loss, device {device}, {dtype}")

    def batches():  # endless stream of shuffled micro-batches of pairs, epoch after epoch
        g = torch.Generator().manual_seed(args.seed)
        while True:
            order = torch.randperm(len(train), generator=g).tolist()
            for i in range(0, len(order), args.batch_size):
                yield [train[j] for j in order[i : i + args.batch_size]]

    metrics_file = open(out / "metrics.jsonl", "w")

    def log(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in record.items()))

    reward_model = None

    def sample_and_score(path: Path) -> dict:  # the same prompts and sampling seed every time
        nonlocal ref_model, reward_model
        if ref_model is None:  # freed for training
            ref_model = load_model(ref_name, args.trust_remote_code).to(device).eval()
        if reward_model is None:
            reward_model = load_scalar_model(args.reward_model, pad_id, args.trust_remote_code)
            reward_model = reward_model.to(device).eval()
        with torch.random.fork_rng():  # training's random state is left as it was
            torch.manual_seed(args.seed)
            metrics, samples = evaluate_samples(policy.eval(), ref_model, reward_model, tokenizer, prompts,
                                                args, device, autocast, stop_ids)
        policy.train()
        path.parent.mkdir(exist_ok=True)
        with open(path, "w") as f:
            for row in samples:
                f.write(json.dumps(row) + "\n")
        return metrics

    if use_rm and args.sample_every:
        log({"step": 0, **sample_and_score(out / "samples" / "step_000000.jsonl")})
    stream, train_time, tokens_seen, window, n_window = batches(), 0.0, 0, {}, 0
    for step in tqdm(range(1, total_steps + 1), desc="dpo", dynamic_ncols=True, disable=None):
        step_start = time.time()
        micro = [next(stream) for _ in range(args.gradient_accumulation_steps)]
        n_pairs = sum(len(chunk) for chunk in micro)
        for chunk in micro:
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            if not args.precompute_ref:
                with torch.no_grad():
                    ref_chosen, ref_rejected = batch_logps(ref_model, batch, autocast).chunk(2)
                for p, c, r in zip(chunk, ref_chosen.tolist(), ref_rejected.tolist()):
                    p["ref_chosen_logps"], p["ref_rejected_logps"] = c, r
            policy_chosen, policy_rejected = batch_logps(policy, batch, autocast).chunk(2)
            metrics = pair_metrics(chunk, policy_chosen, policy_rejected, args)
            (metrics["train/loss"].sum() / n_pairs).backward()  # mean over the optimiser step's pairs
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v.detach().sum().item()
            n_window += len(chunk)
            tokens_seen += batch["attention_mask"].sum().item()
        if not math.isfinite(window["train/loss"]):
            raise SystemExit(f"error: the loss became {window['train/loss']} at step {step}; stopping, "
                             f"nothing saved in {out}. Try a lower --learning_rate.")
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.time() - step_start

        if step % args.log_every == 0 or step == total_steps:
            log({"step": step, **{k: v / n_window for k, v in window.items()}, "train/grad_norm": grad_norm,
                 "train/lr": scheduler.get_last_lr()[0], "perf/tokens_per_s": tokens_seen / train_time})
            window, n_window = {}, 0
        if use_rm and args.sample_every and step % args.sample_every == 0 and step < total_steps:
            log({"step": step, **sample_and_score(out / "samples" / f"step_{step:06d}.jsonl")})
    metrics_file.close()
    save_model(policy, tokenizer, out)

    # evaluation: implicit rewards on held-out pairs, then samples scored by the reward model
    results = {"train/steps": total_steps, "train/runtime_s": round(train_time, 1),
               "perf/tokens_per_s": round(tokens_seen / train_time, 1)}
    if evals:
        results.update(evaluate_pairs(policy, evals, args, pad_id, device, autocast))
    if use_rm:
        results.update(sample_and_score(out / "samples.jsonl"))
    with open(out / "eval.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nsaved to {out}: " + json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
