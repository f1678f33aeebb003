"""Speed, side by side: minialign's trainers against TRL's on the same model, rows and core; PPO's phases
against the floor of the passes they cannot avoid; and how DPO and VAR scale.

    pip install -r benchmark/requirements.txt   # trl==1.16.0: needed here only, never by the scripts
    python benchmark/speed.py                   # the toy (toy/sft, toy/rm, toy/data): ~6 minutes
    python benchmark/speed.py --code ../old     # the same numbers for another checkout: before / after
    python benchmark/speed.py --make-smollm-shape /tmp/smol   # a random model of SmolLM2-135M's shapes
    python benchmark/speed.py --model /tmp/smol --reward_model /tmp/smol-rm
    python benchmark/speed.py --model /tmp/smol --parts sft reward_model dpo --dtype bfloat16   # both in bf16

What is measured, and how:
1. sft, reward_model, dpo: minialign's script (`main(Args(...))`, imported from --code) and its TRL
   counterpart (SFTTrainer, RewardTrainer, DPOTrainer), A then B, --pairs times. Every run is its own
   subprocess, one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)) pinned to one core (the same
   core for every run), and runs --warmup + --steps optimiser steps. A global optimizer step post-hook
   (torch.optim.optimizer.register_optimizer_step_post_hook) stamps time.perf_counter() after every
   step, in both; the time between two stamps is one step, everything a trainer does per step
   (collation, forward, loss, backward, clipping, step, its logging). The first --warmup steps are
   dropped and the median of the rest is the run's step time. Reported per method: TRL / minialign
   step time (min / median / max over the pairs), tokens/s and peak memory of each side.
2. ppo: ppo.main with its rollout and its two forward helpers wrapped by timers. Each iteration splits
   into the rollout (generate), the no-grad forwards (reward, old policy, reference, value: what the
   helpers take under no_grad) and the update (from the first forward with gradient to the step's
   stamp). Each is divided by its floor: the same generate call, the same four forwards (the LM head
   only at the positions that predict a response token), and the same policy + value forward + backward
   + AdamW step, made by plain transformers calls on the shapes that iteration had (the first iteration
   is a warm-up for both).
3. scaling: DPO step time at each --lengths (rows made long enough from toy responses that every
   sequence is exactly max_length tokens), and VAR's frozen scoring (B x B reward-model passes per
   group) at each --var_batch_sizes over the same --var_rows rows, per example and per scored sequence.

Fairness:
- the same model weights (loaded by both in fp32), the same rows (written to one file both read, one
  epoch's worth: batch_size x steps), batch size, max_length, learning rate and schedule shape, AdamW
  betas, no gradient accumulation, no gradient checkpointing (TRL turns it on by default: off here),
  the same --dtype (fp32 by default: TRL's bf16 off; bfloat16: both autocast), no evaluation, no saving,
  dropout off in both;
- tokens/s counts the non-pad tokens of the rows fed (chat template applied, cut at max_length), once,
  in this process, the same way for both sides: so the two tokens/s differ exactly as the step times;
- TRL at its fastest documented settings that apply to a CPU: DPO with precompute_ref_log_probs=True
  (the reference log-probs once, before training, as minialign does by default); its default fused
  AdamW (transformers picks adamw_torch_fused for torch >= 2.8) and its fused, chunked LM-head
  log-probs are kept. Padding-free batching and packing need FlashAttention (CUDA) and packing also
  changes the rows a step sees; Liger kernels need Triton: none applies here;
- peak memory is the process's peak RSS (resource.getrusage) on a CPU, which includes each side's
  imports and, for minialign's DPO, the separate reference model it loads for the precompute (TRL's
  uses the policy itself); on CUDA it is torch.cuda.max_memory_allocated. CUDA steps are synchronised
  before each stamp;
- A/B interleaving spreads slow drifts of the machine over both sides, and the min / max show what is
  left: run on an otherwise idle machine (a busy one makes single steps 20-50% noisier).
"""

import dataclasses
import gc
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import tyro

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "toy"
TRAINERS = ["sft", "reward_model", "dpo"]
PARTS = TRAINERS + ["ppo", "dpo_length", "var_batch"]
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, head_dim=64,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0)


@dataclass
class Args:
    """Speed of minialign against TRL 1.16 on one core, and of PPO's phases against their floors. The
    defaults run everything on the toy in about 6 minutes; the table goes to stdout and --results_dir."""

    # what to run
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    """which measurements: sft, reward_model, dpo (each against TRL), ppo (phases against floors),
    dpo_length (DPO step time against max_length), var_batch (VAR frozen scoring against batch size)"""
    code: str = str(ROOT)
    """checkout whose scripts (sft.py, dpo.py, ...) are measured: another one gives before / after numbers"""
    make_smollm_shape: Optional[str] = None
    """write a randomly initialised Llama with SmolLM2-135M's shapes (hidden 576, 30 layers, 9
    heads, 3 KV heads, intermediate 1536, vocab 49152, tied embeddings) to this directory, and a
    reward model of the same shapes to <dir>-rm, then stop. Both reuse the toy tokenizer (592
    tokens): the data's ids stay below its vocab size, while the embedding keeps SmolLM2's 49152
    rows, so every matrix has the real shape (PPO's rollouts may sample ids above 592; only the
    shapes matter for speed)"""

    # models and data
    model: str = str(TOY / "sft")
    """local model directory every part starts from (the policy)"""
    reward_model: Optional[str] = None
    """reward model for ppo and var_batch (default: <model>-rm if that exists, else toy/rm)"""
    sft_rows: str = str(TOY / "data" / "sft" / "train.jsonl")
    """SFT rows (`messages`, or `prompt` + `completion`)"""
    pref_rows: str = str(TOY / "data" / "prefs" / "train.jsonl")
    """preference rows (`prompt`, `chosen`, `rejected`) for reward_model, dpo and var_batch"""
    prompt_rows: str = str(TOY / "data" / "prompts" / "train.jsonl")
    """prompt rows (`prompt`) for ppo"""

    # the training comparison
    pairs: int = 3
    """A/B pairs (minialign, then TRL) per method"""
    steps: int = 12
    """timed optimiser steps per run"""
    warmup: int = 3
    """optimiser steps run before the timed ones and dropped (at least 1: a step is the time between
    two stamps)"""
    batch_size: int = 16
    """examples (sft) or pairs (reward_model, dpo) per step"""
    max_length: int = 1024
    """prompt + response tokens per sequence (the toy's rows are far shorter)"""
    learning_rate: float = 1e-4
    """peak learning rate, both sides (linear warmup over 10% of the steps, then linear decay)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """compute dtype of the sft, reward_model and dpo comparison, both sides: bfloat16 is minialign's
    --dtype bfloat16 and TRL's bf16=True, both autocast over fp32 weights (ppo and the scaling parts
    stay fp32)"""

    # ppo
    ppo_iterations: int = 4
    """timed PPO iterations (after one warm-up iteration)"""
    ppo_batch_size: int = 64
    """prompts per rollout (ppo.py's default; one minibatch per batch, as its default)"""
    ppo_max_new_tokens: int = 64
    """rollout length limit (ppo.py's default)"""

    # scaling
    lengths: list[int] = field(default_factory=lambda: [64, 128, 256])
    """max_length values of the DPO sweep (the toy's positions end at 256)"""
    length_batch_size: int = 4
    """pairs per step in the DPO sweep (small, so that the longest rows stay quick on one core)"""
    var_batch_sizes: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    """VAR batch sizes B of the frozen-scoring sweep (even: a pair's two responses share a group)"""
    var_rows: int = 64
    """preference rows (2 examples each) scored at every B"""

    # setup
    device: str = "auto"
    """cpu or cuda (auto: cuda when available)"""
    core: Optional[int] = None
    """the CPU core every run is pinned to (default: the last one this process may use)"""
    results_dir: str = str(ROOT / "benchmark" / "results")
    """where speed.md and speed.json go"""
    timeout: int = 1800
    """seconds one run may take before it is stopped"""
    keep: bool = False
    """keep the folder of the runs (each one's spec, rows and log) and print where it is"""


# ---------------------------------------------------------------------------------------------------
# Numbers and the table (pure: tested on fake numbers)


def median_step(stamps: list, warmup: int) -> float:
    """The median time between consecutive step stamps, without the first `warmup` steps. Stamp k is
    taken after step k + 1, so step k + 1 lasted stamps[k] - stamps[k - 1] (step 1 has no start)."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])][warmup - 1 :]
    if not steps:
        raise ValueError(f"{len(stamps)} step stamps leave no step after {warmup} warm-up steps")
    return statistics.median(steps)


def spread(values: list) -> tuple:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def summarise_trainer(runs: list, tokens_per_step: float) -> dict:
    """runs: one (minialign, trl) pair of run results per A/B pair, each {"step_s", "peak_mib"}."""
    ratios = [trl["step_s"] / mini["step_s"] for mini, trl in runs]
    mini = statistics.median(m["step_s"] for m, _ in runs)
    trl = statistics.median(t["step_s"] for _, t in runs)
    return {"ratio": spread(ratios), "minialign_step_s": mini, "trl_step_s": trl,
            "minialign_tokens_per_s": tokens_per_step / mini, "trl_tokens_per_s": tokens_per_step / trl,
            "minialign_peak_mib": max(m["peak_mib"] for m, _ in runs),
            "trl_peak_mib": max(t["peak_mib"] for _, t in runs), "tokens_per_step": tokens_per_step}


def summarise_phases(iterations: list, floors: list) -> dict:
    """Per phase: median time, median floor, and the spread of the per-iteration ratios."""
    out = {}
    for phase in ("rollout", "forwards", "update"):
        times, bases = [it[phase] for it in iterations], [f[phase] for f in floors]
        out[phase] = {"s": statistics.median(times), "floor_s": statistics.median(bases),
                      "ratio": spread([t / b for t, b in zip(times, bases)])}
    return out


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def times(ratio: float) -> str:
    return f"{ratio:.2f}x"


def format_tables(results: dict) -> str:
    """The Markdown report of whatever parts `results` holds."""
    s = results["setup"]
    lines = ["# Speed: minialign against TRL", "",
             f"Model `{s['model']}` ({s['params_m']:.1f}M parameters), {s['device']}, one thread pinned to "
             f"core {s['core']}; torch {s['torch']}, transformers {s['transformers']}, trl {s['trl']}; "
             f"code `{s['code']}` ({s['code_rev']}); {s['date']}.", ""]
    if results.get("trainers"):
        lines += [f"## Training steps ({s['steps']} timed after {s['warmup']} warm-up, batch "
                  f"{s['batch_size']}, {s['pairs']} A/B pairs, {s.get('dtype', 'float32')})", "",
                  "Step time: median over the timed steps of a run, then over the pairs. TRL / minialign: "
                  "min / median / max over the pairs (above 1: minialign is faster).", "",
                  "| method | tokens/step | minialign ms/step | TRL ms/step | TRL / minialign | "
                  "minialign tokens/s | TRL tokens/s | minialign peak MiB | TRL peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, r in results["trainers"].items():
            lo, mid, hi = r["ratio"]
            lines.append(f"| {method} | {r['tokens_per_step']:.0f} | {ms(r['minialign_step_s'])} | "
                         f"{ms(r['trl_step_s'])} | {times(lo)} / **{times(mid)}** / {times(hi)} | "
                         f"{r['minialign_tokens_per_s']:.0f} | {r['trl_tokens_per_s']:.0f} | "
                         f"{r['minialign_peak_mib']:.0f} | {r['trl_peak_mib']:.0f} |")
        lines.append("")
    if results.get("ppo"):
        p = results["ppo"]
        names = {"rollout": f"rollout: generate, {p['batch']} prompts x {p['response_len']} tokens",
                 "forwards": "no-grad forwards: reward, old policy, reference, value",
                 "update": "update: policy + value forward, backward, step"}
        lines += [f"## PPO: each phase against its floor ({p['iterations']} timed iterations)", "",
                  "Floor: the same passes by plain transformers calls on the same shapes (generate; four "
                  "forwards, the LM head only where a response token is predicted; forward + backward of "
                  "both models and one AdamW step). Ratio: min / median / max over the iterations.", "",
                  "| phase | minialign ms | floor ms | phase / floor |", "|---|---|---|---|"]
        for phase, r in p["phases"].items():
            lo, mid, hi = r["ratio"]
            lines.append(f"| {names[phase]} | {ms(r['s'])} | {ms(r['floor_s'])} | "
                         f"{times(lo)} / **{times(mid)}** / {times(hi)} |")
        lines.append("")
    if results.get("dpo_length"):
        rows = results["dpo_length"]
        base = rows[0]
        lines += ["## DPO step time against max_length", "",
                  f"Every sequence is exactly max_length tokens; batch {s['length_batch_size']} pairs, "
                  f"{s['steps']} timed steps, one A/B pair per length. Per token: minialign's step time per "
                  f"token relative to max_length {base['max_length']} (1.00x: linear in length).", "",
                  "| max_length | tokens/step | minialign ms/step | minialign tokens/s | per token vs "
                  f"{base['max_length']} | TRL ms/step | TRL tokens/s | TRL / minialign |",
                  "|---|---|---|---|---|---|---|---|"]
        per_token = base["minialign_step_s"] / base["tokens_per_step"]
        for r in rows:
            rel = r["minialign_step_s"] / r["tokens_per_step"] / per_token
            lines.append(f"| {r['max_length']} | {r['tokens_per_step']:.0f} | {ms(r['minialign_step_s'])} | "
                         f"{r['minialign_tokens_per_s']:.0f} | {times(rel)} | {ms(r['trl_step_s'])} | "
                         f"{r['trl_tokens_per_s']:.0f} | {times(r['ratio'][1])} |")
        lines.append("")
    if results.get("var_batch"):
        rows = results["var_batch"]
        lines += ["## VAR frozen scoring against batch size", "",
                  f"The same {rows[0]['examples']} examples at every B: B x B reward-model passes per group "
                  "of B, so the time per example grows like B by design; the time per scored sequence is "
                  "the implementation's cost.", "",
                  "| B | groups | scored sequences | frozen s | ms per example | ms per scored sequence |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['batch_size']} | {r['groups']} | {r['scored']} | {r['frozen_s']:.2f} | "
                         f"{ms(r['frozen_s'] / r['examples'])} | {1000 * r['frozen_s'] / r['scored']:.2f} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Rows and token counts (the parent process: the same count for both sides)


def read_rows(path: str) -> list:
    return [json.loads(line) for line in open(path) if line.strip()]


def as_prompt_completion(row: dict) -> dict:
    """An SFT row as conversational prompt + completion, a format both sides read the same way."""
    if "messages" in row:
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
    return {"prompt": row["prompt"], "completion": row["completion"]}


def count_tokens(tokenizer, prompt, completion) -> int:
    """Tokens of prompt + completion through the chat template (strings: joined as they are)."""
    if isinstance(prompt, str):
        return len(tokenizer(prompt + completion)["input_ids"])
    text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokens_per_row(tokenizer, method: str, rows: list, max_length: int) -> float:
    """Mean non-pad tokens per row as the trainers see it: one sequence per SFT row, two per pair, cut at
    max_length (dpo, sft) or, for the reward model, pairs longer than max_length left out (both do)."""
    counts = []
    for row in rows:
        if method == "sft":
            counts.append(min(count_tokens(tokenizer, row["prompt"], row["completion"]), max_length))
            continue
        sides = [count_tokens(tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected")]
        if method == "reward_model":
            if max(sides) <= max_length:
                counts.append(sum(sides))
        else:
            counts.append(sum(min(n, max_length) for n in sides))
    return sum(counts) / len(counts)


def lengthen(rows: list, tokenizer, length: int) -> list:
    """Preference rows whose chosen and rejected responses each fill at least `length` tokens (with the
    prompt): each response is its row's response followed by those of the next rows, so every sequence
    is cut to exactly `length` by both sides' truncation."""
    out = []
    for i, row in enumerate(rows):
        long = {"prompt": row["prompt"]}
        for side in ("chosen", "rejected"):
            texts, j = [], i
            while True:
                value = rows[j % len(rows)][side]
                texts.append(value if isinstance(value, str) else value[-1]["content"])
                completion = (" ".join(texts) if isinstance(row[side], str)
                              else [{"role": "assistant", "content": " ".join(texts)}])
                j += 1
                if count_tokens(tokenizer, row["prompt"], completion) > length:
                    break
            long[side] = completion
        out.append(long)
    return out


def write_rows(rows: list, folder: Path) -> Path:
    """rows as folder/train.jsonl: a dataset directory for minialign, a json file for TRL."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------------
# The worker: one run in its own process, one thread, one core


def setup_worker(core: Optional[int]) -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def stamp_steps(device: str) -> tuple:
    """(stamps, hook handle): time.perf_counter() after every optimiser step of any optimiser. A
    wrapper that steps an inner optimiser (accelerate's AcceleratedOptimizer) is not counted twice."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps = []

    def after_step(optimizer, args, kwargs):
        if isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            return
        sync(device)
        stamps.append(time.perf_counter())

    return stamps, register_optimizer_step_post_hook(after_step)


def load_script(code: str, name: str):
    """The script `name`.py of the checkout `code`, imported as a module."""
    spec = importlib.util.spec_from_file_location(f"measured_{name}", Path(code) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def script_args(module, values: dict):
    """module.Args(**values), leaving out (and saying) the fields an older checkout does not have."""
    known = {f.name for f in dataclasses.fields(module.Args)}
    missing = sorted(set(values) - known)
    if missing:
        print(f"note: {module.__name__}.Args has no {missing}; left at the script's own behaviour")
    return module.Args(**{k: v for k, v in values.items() if k in known})


def run_minialign(spec: dict) -> dict:
    module = load_script(spec["code"], spec["method"])
    total = spec["warmup"] + spec["steps"]
    values = dict(dataset=spec["data"], train_split="train", eval_split=None, model=spec["model"],
                  max_length=spec["max_length"], max_steps=total, batch_size=spec["batch_size"],
                  gradient_accumulation_steps=1, learning_rate=spec["learning_rate"], warmup_ratio=0.1,
                  adam_betas=(0.9, 0.95), weight_decay=0.0, max_grad_norm=1.0, output_dir=spec["out"],
                  overwrite=True, log_every=total, save_every=0, seed=0, device=spec["device"],
                  dtype=spec["dtype"])
    if spec["method"] == "sft":
        values.update(eval_every=0, num_samples=0)
    elif spec["method"] == "reward_model":
        values.update(eval_every=0)
    else:
        values.update(reward_model="none", precompute_ref=True, beta=0.1)
    stamps, hook = stamp_steps(spec["device"])
    module.main(script_args(module, values))
    hook.remove()
    return {"stamps": stamps, "step_s": median_step(stamps, spec["warmup"]),
            "peak_mib": peak_mib(spec["device"])}


def run_trl(spec: dict) -> dict:
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    total = spec["warmup"] + spec["steps"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    data = load_dataset("json", data_files=str(Path(spec["data"]) / "train.jsonl"), split="train")
    common = dict(output_dir=spec["out"], max_steps=total, per_device_train_batch_size=spec["batch_size"],
                  gradient_accumulation_steps=1, learning_rate=spec["learning_rate"],
                  lr_scheduler_type="linear", warmup_steps=int(0.1 * total), adam_beta1=0.9, adam_beta2=0.95,
                  weight_decay=0.0, max_grad_norm=1.0, bf16=spec["dtype"] == "bfloat16", fp16=False,
                  gradient_checkpointing=False,
                  eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
                  disable_tqdm=True, seed=0, use_cpu=spec["device"] == "cpu", dataloader_num_workers=0,
                  max_length=spec["max_length"])
    if spec["method"] == "sft":
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common), train_dataset=data,
                                 processing_class=tokenizer)
    elif spec["method"] == "reward_model":
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1,
                                                                   dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = trl.RewardTrainer(model=model, args=trl.RewardConfig(**common), train_dataset=data,
                                    processing_class=tokenizer)
    else:  # the reference log-probs once, before training: TRL's fastest DPO, and minialign's default
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        config = trl.DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                               precompute_ref_batch_size=2 * spec["batch_size"])
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    stamps, hook = stamp_steps(spec["device"])
    trainer.train()
    hook.remove()
    return {"stamps": stamps, "step_s": median_step(stamps, spec["warmup"]),
            "peak_mib": peak_mib(spec["device"])}


def run_ppo(spec: dict) -> dict:
    """ppo.main with its phases timed, then the floors on the shapes each iteration had."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    ppo = load_script(spec["code"], "ppo")
    device = spec["device"]
    iterations = []
    rollout, policy_logprobs, values_and_scores = ppo.rollout, ppo.policy_logprobs, ppo.values_and_scores

    def timed_rollout(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        batch = rollout(*args, **kwargs)
        sync(device)
        iterations.append({"rollout": time.perf_counter() - start, "forwards": 0.0, "updates": [],
                           "batch": {k: batch[k].cpu() for k in ("query", "query_mask", "response", "mask")}})
        return batch

    def timed(helper):
        def wrapper(*args, **kwargs):
            it = iterations[-1]
            sync(device)
            start = time.perf_counter()
            out = helper(*args, **kwargs)
            if torch.is_grad_enabled():  # the update's first forward starts the update's clock
                it.setdefault("update_start", start)
            else:
                sync(device)
                it["forwards"] += time.perf_counter() - start
            return out
        return wrapper

    def after_step(optimizer, args, kwargs):
        sync(device)
        it = iterations[-1]
        it["updates"].append(time.perf_counter() - it.pop("update_start"))

    ppo.rollout, ppo.policy_logprobs = timed_rollout, timed(policy_logprobs)
    ppo.values_and_scores = timed(values_and_scores)
    hook = register_optimizer_step_post_hook(after_step)
    n = spec["iterations"] + 1
    args = script_args(ppo, dict(
        prompts=spec["data"], train_split="train", eval_split=None, model=spec["model"],
        reward_model=spec["reward_model"], total_episodes=n * spec["batch_size"],
        batch_size=spec["batch_size"], minibatch_size=spec["batch_size"],
        max_new_tokens=spec["max_new_tokens"], output_dir=spec["out"], overwrite=True, log_every=n,
        save_every=0, seed=0, device=device, dtype="float32"))
    ppo.main(args)
    hook.remove()
    gc.collect()  # ppo's four models, before the floor's four
    for it in iterations:
        it["update"] = sum(it.pop("updates"))
    models = floor_models(spec, args)
    floors = [ppo_floor(models, it["batch"], spec["device"], args.temperature) for it in iterations]
    timed_its = [{k: it[k] for k in ("rollout", "forwards", "update")} for it in iterations]
    return {"iterations": timed_its[1:], "floors": floors[1:], "warmup_iteration": timed_its[0],
            "batch": spec["batch_size"], "peak_mib": peak_mib(device),
            "response_len": [it["batch"]["response"].shape[1] for it in iterations]}


def floor_models(spec: dict, ppo_args) -> dict:
    """Fresh copies of PPO's four models, loaded by plain transformers calls, and an AdamW over the two
    that train, with ppo's hyperparameters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def causal_lm():
        return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).to(spec["device"])

    def classifier():
        return AutoModelForSequenceClassification.from_pretrained(
            spec["reward_model"], num_labels=1, dtype=torch.float32).to(spec["device"])

    m = {"policy": causal_lm(), "ref": causal_lm(), "reward": classifier(), "value": classifier()}
    params = list(m["policy"].parameters()) + list(m["value"].parameters())
    m["optimizer"] = torch.optim.AdamW(params, lr=ppo_args.learning_rate, betas=ppo_args.adam_betas,
                                       eps=ppo_args.adam_eps)
    return m


def ppo_floor(m: dict, batch: dict, device: str, temperature: float) -> dict:
    """The unavoidable passes of one PPO iteration by plain transformers calls, timed: generate the
    same number of tokens for the same prompts; the four no-grad forwards (two causal LMs, two
    sequence classifiers) on query + response; both trainable models' forward + backward + AdamW step.
    The causal LMs' head runs only at the R + 1 positions that predict the response (logits_to_keep):
    the rest is not needed, so it is no part of a floor."""
    import torch
    from transformers import GenerationConfig

    batch = {k: v.to(device) for k, v in batch.items()}
    R = batch["response"].shape[1]
    mask = torch.cat([batch["query_mask"], batch["mask"]], 1)
    full = {"input_ids": torch.cat([batch["query"], batch["response"]], 1), "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    out = {}
    for model in m["policy"], m["ref"], m["reward"], m["value"]:
        model.eval()
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=R,
                              min_new_tokens=R, pad_token_id=m["policy"].config.pad_token_id)
    m["policy"].generation_config = config
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        m["policy"].generate(input_ids=batch["query"], attention_mask=batch["query_mask"],
                             generation_config=config)
        sync(device)
        out["rollout"] = time.perf_counter() - start
        start = time.perf_counter()
        m["reward"](**full), m["value"](**full)
        m["policy"](**full, logits_to_keep=R + 1), m["ref"](**full, logits_to_keep=R + 1)
        sync(device)
        out["forwards"] = time.perf_counter() - start
    m["policy"].train(), m["value"].train()
    start = time.perf_counter()
    logits = m["policy"](**full, logits_to_keep=R + 1).logits
    loss = logits.float().mean() + m["value"](**full).logits.float().mean()  # any loss of both outputs
    loss.backward()
    m["optimizer"].step()
    m["optimizer"].zero_grad(set_to_none=True)
    sync(device)
    out["update"] = time.perf_counter() - start
    return out


def run_var(spec: dict) -> dict:
    """var.main for one optimiser step, its frozen scoring timed group by group."""
    var = load_script(spec["code"], "var")
    device, calls = spec["device"], []
    group_weights = var.group_weights

    def timed_group_weights(group, *args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = group_weights(group, *args, **kwargs)
        sync(device)
        calls.append((len(group), time.perf_counter() - start))
        return out

    var.group_weights = timed_group_weights
    results = var.main(script_args(var, dict(
        dataset=spec["data"], train_split="train", model=spec["model"], reward_model=spec["reward_model"],
        batch_size=spec["batch_size"], max_steps=1, max_length=spec["max_length"], eval_prompts="none",
        normalizer="reward", output_dir=spec["out"], overwrite=True, save_every=0, seed=0, device=device,
        dtype="float32")))
    return {"frozen_s": sum(t for _, t in calls), "groups": len(calls),
            "examples": sum(b for b, _ in calls), "scored": sum(b * b for b, _ in calls),
            "perf/frozen_s": results.get("perf/frozen_s"), "peak_mib": peak_mib(device)}


def worker(spec_file: str) -> None:
    spec = json.load(open(spec_file))
    setup_worker(spec["core"])
    run = {"minialign": run_minialign, "trl": run_trl, "ppo": run_ppo, "var": run_var}[spec["side"]]
    result = run(spec)
    with open(spec["result"], "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------------
# The parent: runs the workers in turn and collects their numbers


def launch(spec: dict, args: Args, work: Path, name: str) -> dict:
    """One worker process (this file, --worker), its own folder, one thread; returns its result."""
    folder = work / name
    folder.mkdir(parents=True)
    spec = {**spec, "code": str(Path(args.code).resolve()), "device": resolved_device(args.device),
            "core": pick_core(args.core), "out": str(folder / "out"), "result": str(folder / "result.json")}
    json.dump(spec, open(folder / "spec.json", "w"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(folder / "datasets-cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    print(f"  {name} ...", end=" ", flush=True)
    start = time.time()
    with open(folder / "log.txt", "w") as log:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder / "spec.json")]
        code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    if code != 0:
        tail = "".join(open(folder / "log.txt").readlines()[-25:])
        raise SystemExit(f"error: the run {name} failed (exit code {code}); the end of its log:\n{tail}")
    result = json.load(open(folder / "result.json"))
    print(f"{time.time() - start:.0f}s" + (f", step {ms(result['step_s'])} ms" if "step_s" in result else ""))
    return result


def resolved_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_core(core: Optional[int]) -> Optional[int]:
    if core is not None or not hasattr(os, "sched_getaffinity"):
        return core
    return max(os.sched_getaffinity(0))


def compare_trainer(method: str, rows: list, tokenizer, args: Args, work: Path, max_length: int,
                    batch_size: int, pairs: int, tag: str) -> dict:
    """`pairs` A/B pairs of one method on the same rows: one epoch of them, batch_size x steps."""
    rows = rows[: batch_size * (args.warmup + args.steps)]
    data = write_rows(rows, work / f"{tag}-rows")
    tokens = tokens_per_row(tokenizer, method, rows, max_length) * batch_size
    spec = {"method": method, "model": args.model, "data": str(data), "max_length": max_length,
            "batch_size": batch_size, "learning_rate": args.learning_rate, "warmup": args.warmup,
            "steps": args.steps, "dtype": args.dtype}
    runs = [tuple(launch({**spec, "side": side}, args, work, f"{tag}-{p + 1}-{side}")
                  for side in ("minialign", "trl")) for p in range(pairs)]
    return {**summarise_trainer(runs, tokens), "runs": runs}


def measure_ppo(args: Args, work: Path, reward_model: str) -> dict:
    data = write_rows(read_rows(args.prompt_rows), work / "ppo-prompts")
    spec = {"side": "ppo", "model": args.model, "reward_model": reward_model, "data": str(data),
            "iterations": args.ppo_iterations, "batch_size": args.ppo_batch_size,
            "max_new_tokens": args.ppo_max_new_tokens}
    r = launch(spec, args, work, "ppo")
    lengths = r["response_len"][1:]
    return {"phases": summarise_phases(r["iterations"], r["floors"]), "iterations": len(r["iterations"]),
            "batch": r["batch"], "peak_mib": r["peak_mib"],
            "response_len": f"{min(lengths)}" + (f"-{max(lengths)}" if max(lengths) > min(lengths) else ""),
            "raw": r}


def measure_var(args: Args, work: Path, reward_model: str) -> list:
    data = write_rows(read_rows(args.pref_rows)[: args.var_rows], work / "var-rows")
    out = []
    for B in args.var_batch_sizes:
        spec = {"side": "var", "model": args.model, "reward_model": reward_model, "data": str(data),
                "batch_size": B, "max_length": args.max_length}
        out.append({"batch_size": B, **launch(spec, args, work, f"var-B{B}")})
    return out


def code_revision(code: str) -> str:
    try:
        rev = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", code, "status", "--porcelain", "--", "*.py"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "not a git checkout"
    return (rev + (" + uncommitted changes" if dirty else "")) if rev else "not a git checkout"


def count_params(model: str) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return sum(p.numel() for p in net.parameters()) / 1e6


def make_smollm_shape(folder: str) -> None:
    """A random Llama of SmolLM2-135M's shapes in `folder` and a reward model of the same shapes in
    `folder`-rm, both with the toy tokenizer (and its chat template and generation config)."""
    import torch
    from transformers import (AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    tokenizer = AutoTokenizer.from_pretrained(TOY / "sft")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M, **ids, attention_dropout=0.0)
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig.from_pretrained(TOY / "sft").save_pretrained(folder)
    rm = LlamaForSequenceClassification(LlamaConfig(**SMOLLM2_135M, **ids, num_labels=1))
    rm.model.load_state_dict(policy.model.state_dict())
    rm.save_pretrained(f"{folder}-rm")
    tokenizer.save_pretrained(f"{folder}-rm")
    n = sum(p.numel() for p in policy.parameters()) / 1e6
    print(f"wrote {folder} ({n:.1f}M parameters) and {folder}-rm; now:\n"
          f"  python benchmark/speed.py --model {folder} --reward_model {folder}-rm")


def main(args: Args) -> None:
    paths = ("code", "model", "reward_model", "sft_rows", "pref_rows", "prompt_rows", "results_dir")
    args = dataclasses.replace(args, **{k: str(Path(getattr(args, k)).resolve()) for k in paths
                                        if getattr(args, k)})  # the workers see the same files
    if args.make_smollm_shape:
        make_smollm_shape(args.make_smollm_shape)
        return
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or args.warmup < 1 or args.steps < 1 or args.pairs < 1:
        raise SystemExit(f"error: --parts takes {PARTS} (got {unknown}); --warmup, --steps and --pairs must "
                         "be at least 1")
    import torch
    import transformers
    from transformers import AutoTokenizer

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
        if set(args.parts) & set(TRAINERS + ["dpo_length"]):
            raise SystemExit("error: TRL is not installed: pip install -r benchmark/requirements.txt (or "
                             "--parts ppo var_batch, which do not need it)")
    reward_model = args.reward_model or (f"{args.model}-rm" if Path(f"{args.model}-rm").is_dir()
                                         else str(TOY / "rm"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    results = {"setup": {
        "model": args.model, "params_m": count_params(args.model), "reward_model": reward_model,
        "device": resolved_device(args.device), "core": pick_core(args.core), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl_version, "code": args.code,
        "code_rev": code_revision(args.code), "date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps,
        "warmup": args.warmup, "pairs": args.pairs, "batch_size": args.batch_size,
        "max_length": args.max_length, "learning_rate": args.learning_rate, "dtype": args.dtype,
        "length_batch_size": args.length_batch_size}}
    work = Path(tempfile.mkdtemp(prefix="minialign-speed-"))
    try:
        sft_rows = [as_prompt_completion(r) for r in read_rows(args.sft_rows)]
        pref_rows = read_rows(args.pref_rows)
        for method in [m for m in TRAINERS if m in args.parts]:
            print(f"{method}: minialign against TRL")
            rows = sft_rows if method == "sft" else pref_rows
            results.setdefault("trainers", {})[method] = compare_trainer(
                method, rows, tokenizer, args, work, args.max_length, args.batch_size, args.pairs, method)
        if "ppo" in args.parts:
            print("ppo: phases and floors")
            results["ppo"] = measure_ppo(args, work, reward_model)
        if "dpo_length" in args.parts:
            print("dpo: step time against max_length")
            rows = pref_rows[: args.length_batch_size * (args.warmup + args.steps)]
            results["dpo_length"] = []
            for length in args.lengths:
                r = compare_trainer("dpo", lengthen(rows, tokenizer, length), tokenizer, args, work, length,
                                    args.length_batch_size, 1, f"dpo-L{length}")
                results["dpo_length"].append({"max_length": length, **r})
        if "var_batch" in args.parts:
            print("var: frozen scoring against batch size")
            results["var_batch"] = measure_var(args, work, reward_model)
    finally:
        if args.keep:
            print(f"the runs' folders (spec.json, log.txt): {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    table = format_tables(results)
    print("\n" + table)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.md").write_text(table)
    with open(out / "speed.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"written: {out / 'speed.md'}, {out / 'speed.json'}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":  # one run, started by launch()
        worker(sys.argv[2])
    else:
        main(tyro.cli(Args))
