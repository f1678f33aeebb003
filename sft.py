"""Supervised fine-tuning (SFT): the pi_sft that every alignment method in this project starts from.

Maximum likelihood on demonstrations (x, y), with the loss on the response tokens only:

    L(theta) = - sum_{(x, y) in batch} sum_t log pi_theta(y_t | x, y_<t)  /  (number of response tokens)

The average is over all response tokens of the (accumulated) batch, so gradient accumulation gives
exactly the gradient of one large batch. A row is either `messages` (the last message is the
response, everything before it the prompt, formatted by the tokenizer's chat template) or
`prompt` + `completion` (strings, used as they are, or message lists through the template).

A model directory with a config but no weights (like `toy/base`) starts from random weights: that is
how the toy's pi_sft is trained from scratch. A response ends at its first stop token, as the model
will generate it (template text after the end-of-turn token is not trained on); dropout in the
checkpoint's config stays on, as in ordinary fine-tuning.

    python sft.py                                            # the toy: trains toy/base from scratch
    python sft.py --model Qwen/Qwen2.5-0.5B --dataset HuggingFaceH4/ultrachat_200k \
        --train_split train_sft --eval_split test_sft --learning_rate 2e-5 --batch_size 8
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
    dataset: str = "toy/data/sft"
    """hub name, local directory of {split}.jsonl files, or one .jsonl file; rows hold `messages` or
    `prompt` + `completion`"""
    train_split: str = "train"
    """split to train on"""
    eval_split: Optional[str] = "test"
    """split for the periodic eval loss and the end-of-run samples (None: no evaluation)"""
    max_length: int = 1024
    """prompt + response tokens kept per example; longer responses are cut from the right"""
    max_train_samples: Optional[int] = None
    """train on the first N examples only (None: all)"""
    max_eval_samples: Optional[int] = 512
    """evaluate on the first N examples only (None: all)"""

    # model
    model: str = "toy/base"
    """hub id or local directory; a directory with a config but no weights starts from random weights"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% slower"""

    # optimisation
    num_epochs: int = 3
    """passes over the training data"""
    max_steps: Optional[int] = None
    """stop after this many optimiser steps (overrides num_epochs)"""
    batch_size: int = 32
    """examples per forward pass"""
    gradient_accumulation_steps: int = 1
    """forward passes per optimiser step (effective batch = batch_size * this)"""
    learning_rate: float = 1.5e-3
    """peak learning rate (1.5e-3 suits the toy from scratch; ~2e-5 fine-tunes a pretrained model)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas; beta2 = 0.95 trains the toy from scratch to fewer stray tokens than 0.999"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.1
    """fraction of the steps with linear warmup from 0"""
    lr_schedule: Literal["linear", "cosine"] = "linear"
    """decay to 0 after the warmup"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""

    # logging and output
    output_dir: Optional[str] = None
    """where the run goes (default: runs/sft-<time>); must be empty unless --overwrite"""
    overwrite: bool = False
    """replace the contents of an existing, non-empty output_dir"""
    log_every: int = 20
    """optimiser steps between log lines"""
    eval_every: int = 100
    """optimiser steps between eval losses (0: only at the end)"""
    save_every: int = 0
    """optimiser steps between saves of the model (0: only at the end)"""
    num_samples: int = 8
    """responses sampled for eval prompts at the end (0: none)"""
    max_new_tokens: int = 256
    """length limit of the sampled responses"""
    temperature: float = 1.0
    """sampling temperature of the end-of-run samples"""

    # setup
    seed: int = 0
    """seed of the random initialisation, data order and sampling"""
    device: str = "auto"
    """cuda, cpu, ... (auto: cuda when available)"""
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    """compute dtype: bfloat16 autocasts the forward pass (weights stay fp32); default bf16 on CUDA"""


# ---------------------------------------------------------------------------------------------------
# The method's maths
# ---------------------------------------------------------------------------------------------------
def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the labelled tokens, in fp32.

    logits: (B, T, V) for input positions; labels: (B, T) with -100 on prompt and padding tokens.
    Position t predicts token t+1, hence the shift. Returns a scalar: divide by the token count."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


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


def prompt_and_completion(row: dict) -> tuple:
    if "messages" in row:
        return row["messages"][:-1], row["messages"][-1:]
    return row["prompt"], row["completion"]


def build_examples(data, tokenizer, max_length: int, stop_ids: list) -> list:
    """Token ids and the response mask of every row; rows whose prompt fills max_length are skipped."""
    examples, skipped = [], 0
    for i, row in enumerate(data):
        prompt_ids, completion_ids = tokenize_example(tokenizer, *prompt_and_completion(row), max_length,
                                                      stop_ids, check=(i == 0))
        if not completion_ids:
            skipped += 1
            continue
        examples.append({"input_ids": prompt_ids + completion_ids,
                         "labels": [-100] * len(prompt_ids) + completion_ids})
    if skipped:
        print(f"note: skipped {skipped} examples whose prompt alone reaches max_length={max_length}")
    return examples


def collate(examples: list, pad_id: int) -> dict:
    """Right-pads to the batch's longest sequence. Shape: (B, T) for every tensor."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id)
    labels = torch.full((len(examples), T), -100)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------
# Models, evaluation, sampling, saving
# ---------------------------------------------------------------------------------------------------
def load_model(name: str, trust_remote_code: bool):
    """The other scripts' load_model, plus one case only SFT needs: a directory with a config and no
    weights gives a randomly initialised model (how the toy's pi_sft starts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve(name)
    weights = list(Path(path).glob("*.safetensors")) + list(Path(path).glob("*.bin"))
    try:
        if Path(path).is_dir() and not weights:
            print(f"note: '{name}' has a config but no weights: random initialisation")
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SystemExit(f"error: could not load model '{name}' (offline, or a wrong name?): {e}")


@torch.no_grad()
def evaluate_loss(model, examples: list, batch_size: int, pad_id: int, device, autocast) -> float:
    """Mean negative log-likelihood per response token over `examples`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += sft_loss_sum(logits, batch["labels"]).item()
        count += (batch["labels"][:, 1:] != -100).sum().item()
    model.train()
    return total / max(1, count)


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
def sample(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float, device,
           stop_ids: list) -> list:
    """One response per prompt sampled from softmax(logits / T) (no top-k, no top-p), batched,
    left-padded, stopping on any stop id."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True,
                      add_special_tokens=not isinstance(prompts[0], list)).to(device)
    model.eval()
    config = sampling_config(temperature, max_new_tokens, tokenizer.pad_token_id, stop_ids)
    out = generate(model, batch, config)
    model.train()
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


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
    out = check_output_dir(args.output_dir, "sft", args.overwrite, [args.model])

    # data
    needs = [("messages",), ("prompt", "completion")]
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    train_data = load_split(args.dataset, args.train_split, needs)
    if args.max_train_samples:
        train_data = train_data.select(range(min(args.max_train_samples, len(train_data))))
    stop_ids = stop_token_ids(tokenizer, args.model)
    train = build_examples(train_data, tokenizer, args.max_length, stop_ids)
    eval_rows, evals = [], []
    if args.eval_split:
        eval_data = load_split(args.dataset, args.eval_split, needs)
        if args.max_eval_samples:
            eval_data = eval_data.select(range(min(args.max_eval_samples, len(eval_data))))
        eval_rows, evals = list(eval_data), build_examples(eval_data, tokenizer, args.max_length, stop_ids)

    # model and optimiser
    model = load_model(args.model, args.trust_remote_code).to(device)
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
        optimizer, lambda s: lr_factor(s, total_steps, warmup, args.lr_schedule))
    create_output_dir(out, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"sft: {n_params / 1e6:.2f}M parameters, {len(train)} train / {len(evals)} eval examples, "
          f"{total_steps} steps, device {device}, {dtype}")

    def batches():  # endless stream of shuffled micro-batches, epoch after epoch
        g = torch.Generator().manual_seed(args.seed)
        while True:
            order = torch.randperm(len(train), generator=g).tolist()
            for i in range(0, len(order), args.batch_size):
                yield collate([train[j] for j in order[i : i + args.batch_size]], tokenizer.pad_token_id)

    metrics_file = open(out / "metrics.jsonl", "w")

    def log(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in record.items()))

    stream, train_time, tokens_seen, eval_loss = batches(), 0.0, 0, None
    window_loss, window_tokens = 0.0, 0
    for step in tqdm(range(1, total_steps + 1), desc="sft", dynamic_ncols=True, disable=None):
        step_start = time.time()
        micro = [next(stream) for _ in range(args.gradient_accumulation_steps)]
        n_tokens = sum((mb["labels"][:, 1:] != -100).sum().item() for mb in micro)
        loss_sum = 0.0
        for mb in micro:
            mb = {k: v.to(device) for k, v in mb.items()}
            with autocast:
                logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            loss = sft_loss_sum(logits, mb["labels"]) / n_tokens  # token mean over the whole step
            loss.backward()
            loss_sum += loss.item()
            tokens_seen += mb["attention_mask"].sum().item()
        if not math.isfinite(loss_sum):
            raise SystemExit(f"error: the loss became {loss_sum} at step {step}; stopping. The last good "
                             f"save (if any) is in {out}. Try a lower --learning_rate.")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.time() - step_start
        window_loss, window_tokens = window_loss + loss_sum * n_tokens, window_tokens + n_tokens

        if step % args.log_every == 0 or step == total_steps:
            log({"step": step, "train/loss": window_loss / window_tokens, "train/grad_norm": grad_norm,
                 "train/lr": scheduler.get_last_lr()[0], "perf/tokens_per_s": tokens_seen / train_time})
            window_loss, window_tokens = 0.0, 0
        if evals and ((args.eval_every and step % args.eval_every == 0) or step == total_steps):
            eval_loss = evaluate_loss(model, evals, args.batch_size, tokenizer.pad_token_id, device, autocast)
            log({"step": step, "eval/loss": eval_loss})
        if args.save_every and step % args.save_every == 0:
            save_model(model, tokenizer, out)
    metrics_file.close()

    save_model(model, tokenizer, out)
    results = {"eval/loss": eval_loss, "train/steps": total_steps, "train/runtime_s": round(train_time, 1),
               "perf/tokens_per_s": round(tokens_seen / train_time, 1)}
    if args.num_samples and eval_rows:
        prompts = [prompt_and_completion(r)[0] for r in eval_rows[: args.num_samples]]
        responses = sample(model, tokenizer, prompts, args.max_new_tokens, args.temperature, device, stop_ids)
        with open(out / "samples.jsonl", "w") as f:
            for prompt, response in zip(prompts, responses):
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
                shown = prompt[-1]["content"] if isinstance(prompt, list) else prompt
                print(f"\n> {shown}\n{response}")
    with open(out / "eval.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nsaved to {out}: " + json.dumps(results))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
