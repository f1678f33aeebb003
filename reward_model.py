"""Bradley-Terry reward model: a scalar score r_psi(x, y) learned from pairwise preferences.

Tulu 2.5 (Ivison et al., 2024), Eq. 1: with chosen y_c and rejected y_r for a prompt x,

    L_R(psi) = - E_{(x, y_c, y_r)} [ log sigmoid( r_psi(x, y_c) - r_psi(x, y_r) ) ]

The model is the SFT model with its language-model head replaced by a scalar head
(AutoModelForSequenceClassification, num_labels=1), read at the last real token of prompt + response.
The head starts at std 1/sqrt(hidden_size + 1), as in summarize_from_feedback_details and OpenRLHF.
Chosen and rejected run in one concatenated forward pass. Recipe (Tulu 2.5 App. F): one epoch, lr
warmed up over the first 3% of steps, then decayed linearly to a tenth of its peak.

The score is read at one position everywhere in this project: the last attended token of prompt +
response, which is the response's first stop token (`<|im_end|>` in ChatML), exactly as the policy
emits it. Template text after the end-of-turn token (ChatML's newline) is not part of a response, so
it is not trained on. The index comes from the attention mask, not from `pad_token_id`: transformers'
own pooling reads the last token that is not pad, which with pad == eos (common in chat checkpoints)
is the token before the EOS (and with no pad_token_id it refuses batches, or, as in trl#937, reads
the wrong position). The saved config still carries `pad_token_id` for other readers. Dropout in the
checkpoint's config stays on while training, as in SFT: there is no reference distribution to match.

    python reward_model.py                                   # the toy: toy/sft -> a reward model
    python reward_model.py --model Qwen/Qwen2.5-0.5B-Instruct \
        --dataset trl-lib/ultrafeedback_binarized --learning_rate 1e-5 --batch_size 8 --max_length 1024
"""

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
    train_split: str = "train"
    """split to train on"""
    eval_split: Optional[str] = "test"
    """split for accuracy and margins (None: no evaluation)"""
    max_length: int = 1024
    """pairs with a side longer than this (prompt + response tokens) are skipped, not truncated:
    a truncated response would be scored on what it does not say"""
    max_train_samples: Optional[int] = None
    """train on the first N pairs only (None: all)"""
    max_eval_samples: Optional[int] = None
    """evaluate on the first N pairs only (None: all)"""

    # model
    model: str = "toy/sft"
    """hub id or local directory of the SFT model (or a reward model to train further)"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% slower"""

    # optimisation (Tulu 2.5 App. F: 1 epoch, 3% warmup, linear decay to lr/10; lr 1e-5, batch 512)
    num_epochs: int = 1
    """passes over the training pairs"""
    max_steps: Optional[int] = None
    """stop after this many optimiser steps (overrides num_epochs)"""
    batch_size: int = 16
    """pairs per forward pass (2 * batch_size sequences)"""
    gradient_accumulation_steps: int = 1
    """forward passes per optimiser step"""
    learning_rate: float = 5e-4
    """peak learning rate (5e-4 suits the toy; Tulu 2.5 uses 1e-5 for 7B-70B models)"""
    final_lr_ratio: float = 0.1
    """the learning rate decays linearly to this fraction of its peak (Tulu 2.5: 1e-6 / 1e-5)"""
    warmup_ratio: float = 0.03
    """fraction of the steps with linear warmup from 0"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""

    # logging and output
    output_dir: Optional[str] = None
    """where the run goes (default: runs/reward_model-<time>); must be empty unless --overwrite"""
    overwrite: bool = False
    """replace the contents of an existing, non-empty output_dir"""
    log_every: int = 20
    """optimiser steps between log lines"""
    eval_every: int = 250
    """optimiser steps between evaluations (0: only at the end)"""

    # setup
    seed: int = 0
    """seed of the score head's initialisation and the data order"""
    device: str = "auto"
    """cuda, cpu, ... (auto: cuda when available)"""
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    """compute dtype: bfloat16 autocasts the forward pass (weights stay fp32); default bf16 on CUDA"""


# ---------------------------------------------------------------------------------------------------
# The method's maths
# ---------------------------------------------------------------------------------------------------
def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of the preference under Bradley-Terry.

    chosen_rewards, rejected_rewards: (B,). Returns (B,). log 2 when the rewards are equal; its
    derivative with respect to the margin r_c - r_r is sigmoid(margin) - 1."""
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float())  # Tulu 2.5 Eq. 1


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
    """Token ids of prompt + chosen and prompt + rejected for every row; too-long pairs are skipped.
    Differs from dpo.py's build_pairs on purpose: no response labels (the score needs none), and no
    truncation (a reward model must not learn to score text cut short)."""
    pairs, skipped = [], 0
    for i, row in enumerate(data):
        prompt, chosen, rejected = split_pair(row)
        seqs = []
        for completion in (chosen, rejected):
            prompt_ids, completion_ids = tokenize_example(tokenizer, prompt, completion, 10**9, stop_ids,
                                                          check=(i == 0))
            seqs.append(prompt_ids + completion_ids)
        if max(map(len, seqs)) > max_length:
            skipped += 1
            continue
        pairs.append({"chosen": seqs[0], "rejected": seqs[1]})
    if skipped:
        print(f"note: skipped {skipped} pairs longer than max_length={max_length}")
    return pairs


def collate_pairs(pairs: list, pad_id: int) -> dict:
    """The chosen sequences, then the rejected ones, right-padded to the longest of all: one forward
    pass for both. Shape: (2B, T); rows [:B] are chosen, rows [B:] rejected. (dpo.py's also carries
    labels: its pairs do, these do not.)"""
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------------
# Model, evaluation, saving
# ---------------------------------------------------------------------------------------------------
def load_reward_model(name: str, pad_token_id: int, trust_remote_code: bool):
    """AutoModelForSequenceClassification with one output; a new score head starts at std
    1/sqrt(hidden_size + 1), small enough that initial rewards are near 0 whatever the backbone."""
    from transformers import AutoModelForSequenceClassification

    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolve(name), num_labels=1, dtype=torch.float32, output_loading_info=True,
            trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SystemExit(f"error: could not load model '{name}' (offline, or a wrong name?): {e}")
    model.config.pad_token_id = pad_token_id
    hidden = model.config.get_text_config().hidden_size
    for param_name, param in model.named_parameters():
        if param_name in info["missing_keys"]:  # the new head
            with torch.no_grad():
                param.normal_(0.0, 1.0 / math.sqrt(hidden + 1)) if param.dim() > 1 else param.zero_()
    return model


@torch.no_grad()
def evaluate(model, pairs: list, batch_size: int, pad_id: int, device, autocast) -> dict:
    """Pairwise accuracy, mean margin, loss and the rewards' mean and std over `pairs`."""
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[i : i + batch_size], pad_id).items()}
        with autocast:
            rewards = score(model, batch["input_ids"], batch["attention_mask"])
        n = rewards.shape[0] // 2
        chosen.append(rewards[:n].cpu())
        rejected.append(rewards[n:].cpu())
    model.train()
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    both = torch.cat([chosen, rejected])
    return {"eval/accuracy": (chosen > rejected).float().mean().item(),
            "eval/margin": (chosen - rejected).mean().item(),
            "eval/loss": bradley_terry_loss(chosen, rejected).mean().item(),
            "eval/reward_mean": both.mean().item(), "eval/reward_std": both.std().item()}


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
    out = check_output_dir(args.output_dir, "reward_model", args.overwrite, [args.model])

    # data
    needs = [("chosen", "rejected")]
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    train_data = load_split(args.dataset, args.train_split, needs)
    if args.max_train_samples:
        train_data = train_data.select(range(min(args.max_train_samples, len(train_data))))
    stop_ids = stop_token_ids(tokenizer, args.model)
    train = build_pairs(train_data, tokenizer, args.max_length, stop_ids)
    evals = []
    if args.eval_split:
        eval_data = load_split(args.dataset, args.eval_split, needs)
        if args.max_eval_samples:
            eval_data = eval_data.select(range(min(args.max_eval_samples, len(eval_data))))
        evals = build_pairs(eval_data, tokenizer, args.max_length, stop_ids)

    # model and optimiser
    model = load_reward_model(args.model, tokenizer.pad_token_id, args.trust_remote_code).to(device)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    micro_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = args.max_steps or args.num_epochs * micro_per_epoch // args.gradient_accumulation_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=args.adam_betas,
                                  weight_decay=args.weight_decay)
    warmup = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, "linear", args.final_lr_ratio))
    create_output_dir(out, args)
    print(f"reward_model: {len(train)} train / {len(evals)} eval pairs, {total_steps} steps, "
          f"device {device}, {dtype}")

    def batches():  # endless stream of shuffled micro-batches of pairs, epoch after epoch
        g = torch.Generator().manual_seed(args.seed)
        while True:
            order = torch.randperm(len(train), generator=g).tolist()
            for i in range(0, len(order), args.batch_size):
                yield collate_pairs([train[j] for j in order[i : i + args.batch_size]],
                                    tokenizer.pad_token_id)

    metrics_file = open(out / "metrics.jsonl", "w")

    def log(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in record.items()))

    stream, train_time, tokens_seen, pairs_seen, eval_metrics = batches(), 0.0, 0, 0, {}
    window = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "n": 0}
    for step in tqdm(range(1, total_steps + 1), desc="reward_model", dynamic_ncols=True, disable=None):
        step_start = time.time()
        micro = [next(stream) for _ in range(args.gradient_accumulation_steps)]
        n_pairs = sum(mb["input_ids"].shape[0] // 2 for mb in micro)
        for mb in micro:
            mb = {k: v.to(device) for k, v in mb.items()}
            with autocast:
                rewards = score(model, mb["input_ids"], mb["attention_mask"])  # (2B,): chosen, then rejected
            chosen_rewards, rejected_rewards = rewards.chunk(2)
            losses = bradley_terry_loss(chosen_rewards, rejected_rewards)
            (losses.sum() / n_pairs).backward()  # mean over the pairs of the whole optimiser step
            tokens_seen += mb["attention_mask"].sum().item()
            window["loss"] += losses.sum().item()
            window["accuracy"] += (chosen_rewards > rejected_rewards).sum().item()
            window["margin"] += (chosen_rewards - rejected_rewards).sum().item()
            window["n"] += losses.shape[0]
        if not math.isfinite(window["loss"]):
            raise SystemExit(f"error: the loss became {window['loss']} at step {step}; stopping, nothing "
                             f"saved in {out}. Try a lower --learning_rate.")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.time() - step_start
        pairs_seen += n_pairs

        if step % args.log_every == 0 or step == total_steps:
            n = window.pop("n")
            log({"step": step, **{f"train/{k}": v / n for k, v in window.items()},
                 "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                 "perf/pairs_per_s": pairs_seen / train_time, "perf/tokens_per_s": tokens_seen / train_time})
            window = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "n": 0}
        if evals and ((args.eval_every and step % args.eval_every == 0) or step == total_steps):
            eval_metrics = evaluate(model, evals, 2 * args.batch_size, tokenizer.pad_token_id, device,
                                    autocast)
            log({"step": step, **eval_metrics})
    metrics_file.close()

    save_model(model, tokenizer, out)
    results = {**eval_metrics, "train/steps": total_steps, "train/runtime_s": round(train_time, 1),
               "perf/pairs_per_s": round(pairs_seen / train_time, 1),
               "perf/tokens_per_s": round(tokens_seen / train_time, 1)}
    with open(out / "eval.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nsaved to {out}: " + json.dumps(results))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
