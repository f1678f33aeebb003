# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch==2.13.0",
#     "transformers==5.23.0",
#     "datasets==5.2.0",
#     "tyro==1.0.17",
# ]
# ///
"""ExPO: weak-to-strong extrapolation, a better-aligned model from an aligned model and its SFT start.

Zheng et al. (2024), Weak-to-Strong Extrapolation Expedites Alignment, Eq. 1: with theta_0 the weights
of the SFT model and theta_1 those of the model aligned from it (by DPO or RLHF),

    theta_2 = theta_1 + alpha * (theta_1 - theta_0) = (1 + alpha) * theta_1 - alpha * theta_0

No training: alpha > 0 moves past the aligned model along the alignment update theta_1 - theta_0 (Sec.
2.2: a first-order step on the alignment objective); alpha = 0 is the aligned model, alpha = -1 the SFT
model. alpha is tuned like a decoding hyperparameter (App. E): sample dev prompts with each alpha of a
grid, score them with a reward model, keep the highest mean reward. The table also reports the sequence KL
to the aligned model and the length: a reward model can be gamed, and the alpha it prefers may be past
the point where responses stay well-formed (on the toy, read samples.jsonl). The paper samples at
temperature 0.7, top-k 40, top-p 0.9; here sampling is pure (temperature 1 by default, never the
checkpoint's own settings), so the KL estimate is unbiased. Every floating tensor is extrapolated
(embeddings, norms and lm_head too, as the authors do), streamed through the safetensors shards in fp32
(the authors load both models whole and compute in bf16), between checkpoints that pair up tensor by
tensor (theta_1 was trained from theta_0).

    python expo.py                      # the toy: toy/sft and toy/dpo, alpha chosen by toy/rm
    python expo.py --sft allenai/tulu-2-7b --aligned allenai/tulu-2-dpo-7b --reward_model runs/rm-tulu2 \
        --prompts trl-lib/ultrafeedback-prompt --prompts_split test --num_prompts 512 --alphas 0.1 0.3 0.5
    (runs/rm-tulu2: a reward model with Tulu 2's tokenizer, e.g. `reward_model.py --model allenai/tulu-2-7b`)
"""

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
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass
class Args:
    """ExPO: extrapolate an aligned model past itself, away from its SFT model (theta_1 + alpha (theta_1 -
    theta_0)), for each alpha of a grid, with no training; sample dev prompts with each, score them with a
    reward model, and save the model of the best alpha. The defaults run the toy in minutes on a CPU.

    Example: python expo.py --sft allenai/tulu-2-7b --aligned allenai/tulu-2-dpo-7b --reward_model runs/rm
    --prompts trl-lib/ultrafeedback-prompt --prompts_split test --num_prompts 512 --alphas 0.1 0.3 0.5"""

    # models
    sft: str = "toy/sft"
    """hub id or local directory of the SFT model theta_0 that the aligned model was trained from"""
    aligned: str = "toy/dpo"
    """hub id or local directory of the aligned (DPO, RLHF) model theta_1"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""

    # method
    alphas: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 1.0)
    """extrapolation strengths to search (Eq. 1); 0 is the aligned model itself, the baseline row"""

    # selection on dev prompts (App. E)
    reward_model: str = "toy/rm"
    """reward model that scores the samples; it must share the aligned model's tokenizer"""
    prompts: str = "toy/data/prompts"
    """prompt dataset (column `prompt`): hub name, local directory of {split}.jsonl files, or a .jsonl file"""
    prompts_split: str = "validation"
    """its split: the dev set alpha is chosen on (keep the test split for the final comparison)"""
    num_prompts: Optional[int] = None
    """sample one response for each of the first N prompts (None: all)"""
    max_prompt_length: int = 1024
    """prompts longer than this many tokens, as the model sees them, are dropped and counted (L_p)"""
    max_new_tokens: int = 256
    """length limit of the sampled responses"""
    temperature: float = 1.0
    """sampling temperature (1.0: the policy itself, so the KL estimate is unbiased)"""
    batch_size: int = 64
    """prompts per sampling and scoring batch"""

    # output and setup
    output_dir: Optional[str] = None
    """where the run goes (default: runs/expo-<time>); must be empty"""
    seed: int = 0
    """seed of the sampling, the same for every alpha so that rows are comparable"""
    device: str = "auto"
    """cuda, cpu, ... (auto: cuda when available)"""
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    """compute dtype of the evaluation: bfloat16 loads the models in bf16 and autocasts (log-probs stay
    fp32); default bf16 on CUDA. The extrapolation is always fp32, saved in the aligned checkpoint's dtype"""


def check_args(args: Args) -> None:
    """Every argument checked before anything is loaded or written: one line each."""
    problems = [
        (args.max_prompt_length < 1,
         f"--max_prompt_length must be at least 1 (got {args.max_prompt_length})"),
        (int(os.environ.get("WORLD_SIZE", 1)) > 1,  # set by torchrun
         "expo.py runs as one process (it trains nothing to shard): start it with python, not torchrun"),
        (not args.alphas, "--alphas is empty; give at least one extrapolation strength"),
        (any(alpha < 0 for alpha in args.alphas),
         f"every alpha must be >= 0 (got {[a for a in args.alphas if a < 0]}): 0 is the aligned model "
         "itself, above 0 extrapolates past it (Eq. 1)"),
        (args.temperature <= 0, f"--temperature must be positive (got {args.temperature}); this script "
                                "samples, and its KL estimate needs the sampled distribution"),
        (args.max_new_tokens < 1, f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})"),
        (args.batch_size < 1, f"--batch_size must be at least 1 (got {args.batch_size})"),
        (args.num_prompts is not None and args.num_prompts < 1,
         f"--num_prompts must be at least 1 (got {args.num_prompts}; leave it out to use all prompts)"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


# ---- The method's maths ---------------------------------------------------------------------------


def extrapolate(sft_tensor: torch.Tensor, aligned_tensor: torch.Tensor, alpha: float) -> torch.Tensor:
    """theta_2 = theta_1 + alpha * (theta_1 - theta_0) for one tensor, computed in fp32 and returned in
    the aligned tensor's dtype: rounded once, where bf16 arithmetic would round alpha * (theta_1 -
    theta_0) and the sum each to 8 significant bits. A non-floating tensor (an integer buffer) is copied
    from the aligned model. Both tensors have the same shape, not necessarily the same dtype; the
    result is a new tensor."""
    if not aligned_tensor.is_floating_point():
        return aligned_tensor.clone()
    theta_0, theta_1 = sft_tensor.float(), aligned_tensor.float()
    theta_2 = (theta_1 - theta_0).mul_(alpha).add_(theta_1)  # Eq. 1, in place: one fp32 temporary, not three
    return theta_2.to(aligned_tensor.dtype)


# ---- Checkpoints: streamed through their safetensors shards ---------------------------------------


def checkpoint_dir(name: str) -> Path:
    """The local folder of a model: a directory as it is; a hub id through the hub's cache (downloaded
    when online), fetching only what ExPO reads: safetensors weights, json configs, tokenizer files."""
    path = locate(name)  # a path that does not exist fails here
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.model",
                                                            "*.txt", "*.py"]))
    except Exception as e:  # the hub raises many types; all mean the same to a user
        raise SystemExit(f"error: could not get model '{name}' (offline, or a wrong name?): {e}")


def read_checkpoint(path: Path) -> tuple:
    """(specs, shards, index) of a safetensors checkpoint, from the shards' headers only: specs maps each
    stored tensor to (dtype, shape, shard file), shards lists the shard files, index is the path of
    model.safetensors.index.json (None for a single model.safetensors)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        shards, index = ["model.safetensors"], None
    else:
        raise SystemExit(f"error: '{path}' holds no model.safetensors or model.safetensors.index.json; ExPO "
                         "streams safetensors checkpoints (re-save the model with save_pretrained)")
    specs = {}
    for shard in shards:
        if not (path / shard).exists():
            raise SystemExit(f"error: '{path}' lists the shard {shard} in its index, but the file is missing")
        with safe_open(path / shard, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                specs[name] = (tensor.get_dtype(), tuple(tensor.get_shape()), shard)
    return specs, shards, index


def check_checkpoints(sft_dir: Path, aligned_dir: Path) -> tuple:
    """Reads both checkpoints' headers and stops, listing every tensor present in only one of them, with
    another shape, or with another dtype unless both are floating (extrapolate upcasts those to fp32).
    Returns (sft_specs, aligned_specs, aligned_shards, aligned_index)."""
    sft_specs, _, _ = read_checkpoint(sft_dir)
    aligned_specs, aligned_shards, aligned_index = read_checkpoint(aligned_dir)
    problems = [f"{name}: only in the SFT checkpoint" for name in sft_specs if name not in aligned_specs]
    problems += [f"{name}: only in the aligned checkpoint" for name in aligned_specs if name not in sft_specs]
    for name in sorted(sft_specs.keys() & aligned_specs.keys()):
        (sft_dtype, sft_shape, _), (aligned_dtype, aligned_shape, _) = sft_specs[name], aligned_specs[name]
        # safetensors dtype names: F32, BF16, F16, F8_E4M3 are floating; I64, BOOL, ... are not
        both_floating = sft_dtype.startswith(("F", "BF")) and aligned_dtype.startswith(("F", "BF"))
        if sft_shape != aligned_shape or (sft_dtype != aligned_dtype and not both_floating):
            problems.append(f"{name}: {sft_dtype}{list(sft_shape)} in the SFT checkpoint, "
                            f"{aligned_dtype}{list(aligned_shape)} in the aligned one")
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise SystemExit(f"error: the SFT checkpoint '{sft_dir}' and the aligned checkpoint '{aligned_dir}' "
                         f"differ in {len(problems)} tensors, so the aligned model was not trained from this "
                         f"SFT model (extrapolating unrelated models collapses them): {shown}")
    return sft_specs, aligned_specs, aligned_shards, aligned_index


def dtype_note(sft_specs: dict, aligned_specs: dict) -> Optional[str]:
    """One line when the checkpoints store tensors in different (floating) dtypes, None when they agree."""
    shared = sorted(sft_specs.keys() & aligned_specs.keys())
    pairs = [(sft_specs[n][0], aligned_specs[n][0]) for n in shared if sft_specs[n][0] != aligned_specs[n][0]]
    if not pairs:
        return None
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    sft = "/".join(dict.fromkeys(names.get(d, d) for d, _ in pairs))
    aligned = "/".join(dict.fromkeys(names.get(d, d) for _, d in pairs))
    return (f"note: the SFT checkpoint is {sft} and the aligned one {aligned}: extrapolating in float32, "
            f"saving in {aligned}")


def extrapolate_checkpoint(sft_dir, aligned_dir, out_dir, alpha: float,
                           trust_remote_code: bool = False) -> dict:
    """Writes theta_2 (Eq. 1) of two safetensors checkpoints to out_dir: the aligned checkpoint's shards
    (same file names, tensors and header metadata, each tensor in its dtype) with its index, configs and
    tokenizer, a directory that from_pretrained loads. Streamed tensor by tensor: the peak memory is one
    output shard plus one tensor's inputs and fp32 result. Tied weights are stored, so extrapolated, once.
    Atomic: written to out_dir/.saving, then moved into place. Returns the counts extrapolated and copied."""
    from transformers import AutoTokenizer

    sft_dir, aligned_dir, out = Path(sft_dir), Path(aligned_dir), Path(out_dir)
    sft_specs, _, aligned_shards, aligned_index = check_checkpoints(sft_dir, aligned_dir)
    tmp = out / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {"extrapolated": 0, "copied": 0}
    for shard in aligned_shards:
        with safe_open(aligned_dir / shard, framework="pt") as f:
            names, metadata = list(f.keys()), f.metadata()
        tensors = {}  # the one output shard held in memory
        for name in names:
            # get_tensor returns a view of the memory-mapped file, whose pages count as resident while it
            # is open: a file per tensor costs a header parse and keeps only the tensors in use mapped
            with safe_open(aligned_dir / shard, framework="pt") as f:
                aligned = f.get_tensor(name)
            with safe_open(sft_dir / sft_specs[name][2], framework="pt") as f:
                sft = f.get_tensor(name)
            tensors[name] = extrapolate(sft, aligned, alpha)
            counts["extrapolated" if aligned.is_floating_point() else "copied"] += 1
            del aligned, sft  # unmaps their pages
        save_file(tensors, tmp / shard, metadata=metadata)
        del tensors
    if aligned_index is not None:  # the same tensors in the same files: the same index
        shutil.copyfile(aligned_index, tmp / aligned_index.name)
    for config in ["config.json", "generation_config.json"]:
        if (aligned_dir / config).exists():
            shutil.copyfile(aligned_dir / config, tmp / config)
    try:
        AutoTokenizer.from_pretrained(aligned_dir, trust_remote_code=trust_remote_code).save_pretrained(tmp)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not load the tokenizer of '{aligned_dir}' to save with it: {e}")
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    return counts


# ---- Evaluation: sampling, log-probs, scoring -----------------------------------------------------


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


def batch_logps(model, batch: dict, autocast, temperature: float = 1.0) -> torch.Tensor:
    """Summed response log-probs of each row of a collate_sequences batch under logits / T (what
    sampling at T draws from), the LM head run only where a response token is predicted. (B,), fp32."""
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=batch["labels"].shape[1]).logits
    return sequence_logps(logits, batch["labels"], temperature)


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


# As in dpo.py, except that args.batch_size is the sampling batch itself (dpo.py samples 4 * its
# training batch of pairs) and each batch is scored as soon as it is sampled.
@torch.no_grad()
def evaluate_samples(policy, ref_model, reward_model, tokenizer, prompts: list, args, device,
                     autocast, stop_ids: list) -> tuple:
    """Samples the policy at args.temperature (no top-k, no top-p; KV-cached, left-padded batches), then
    scores each response with the reward model and measures log pi_T(y|x) - log pi_ref,T(y|x) (both from
    logits / T), whose mean over samples estimates KL(pi_T || pi_ref,T): the KL of what was sampled."""
    tokenizer.padding_side = "left"
    rows = []
    for i in range(0, len(prompts), args.batch_size):
        # 1. sample, in the precision its log-probs are taken in; a response ends at its first stop id
        chunk = prompts[i : i + args.batch_size]
        batch = tokenizer([format_prompt(tokenizer, p) for p in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=not isinstance(chunk[0], list)).to(device)
        with autocast:
            out = generate(policy, batch, args.temperature, args.max_new_tokens, tokenizer.pad_token_id,
                           stop_ids)
        samples = []
        for row, mask, generated in zip(batch["input_ids"], batch["attention_mask"],
                                        out[:, batch["input_ids"].shape[1] :].tolist()):
            ends = [t for t, token in enumerate(generated) if token in stop_ids]
            samples.append((row[mask.bool()].tolist(), generated[: ends[0] + 1] if ends else generated,
                            bool(ends)))
        # 2. the log-ratio to the reference and 3. the score, at the stop token
        batch = {k: v.to(device) for k, v in collate_sequences(samples, tokenizer.pad_token_id).items()}
        logratios = (batch_logps(policy, batch, autocast, args.temperature)
                     - batch_logps(ref_model, batch, autocast, args.temperature))
        with autocast:
            scores = score(reward_model, batch["input_ids"], batch["attention_mask"])
        for (_, r, finished), s, lr in zip(samples, scores.tolist(), logratios.tolist()):
            rows.append({"response": tokenizer.decode(r, skip_special_tokens=True), "score": s,
                         "logratio": lr, "length": len(r), "finished": finished})
    n = len(rows)
    scores = torch.tensor([r["score"] for r in rows])
    metrics = {"eval/score": scores.mean().item(), "eval/score_se": (scores.std() / math.sqrt(n)).item(),
               "eval/kl": sum(r["logratio"] for r in rows) / n,
               "eval/length": sum(r["length"] for r in rows) / n,
               "eval/eos_rate": sum(r["finished"] for r in rows) / n}
    return metrics, [{"prompt": p, **r} for p, r in zip(prompts, rows)]


def format_table(rows: list, best_alpha: float) -> str:
    """The alpha search as a readable table, the chosen row marked."""
    lines = [f"{'alpha':>7}  {'score':>8} {'± se':>6}  {'kl':>7}  {'length':>6}  {'eos':>5}  {'tok/s':>7}"]
    for row in rows:
        mark = "  <- best" if row["alpha"] == best_alpha else ""
        lines.append(f"{row['alpha']:>7g}  {row['eval/score']:>8.3f} {row['eval/score_se']:>6.3f}  "
                     f"{row['eval/kl']:>7.3f}  {row['eval/length']:>6.1f}  {row['eval/eos_rate']:>5.2f}  "
                     f"{row['perf/tokens_per_s']:>7.0f}{mark}")
    return "\n".join(lines)


def main(args: Args) -> dict:
    # setup: every argument and the output dir checked before anything loads
    check_args(args)
    device, dtype, autocast = setup(args)
    weights_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32  # no training: no fp32 masters
    out = check_output_dir(args, "expo", [args.sft, args.aligned, args.reward_model])

    # inputs, all checked before any compute: checkpoints that pair up, one tokenizer for the three models
    sft_dir, aligned_dir = checkpoint_dir(args.sft), checkpoint_dir(args.aligned)
    sft_specs, aligned_specs, _, _ = check_checkpoints(sft_dir, aligned_dir)
    note = dtype_note(sft_specs, aligned_specs)
    if note:
        print(note)
    tokenizer = load_tokenizer(args.aligned, args.trust_remote_code)
    stop_ids = stop_token_ids(tokenizer, args.aligned)
    check_tokenizers(tokenizer, args.aligned, [args.sft, args.reward_model], args.trust_remote_code)
    prompts = load_split(args.prompts, args.prompts_split, [("prompt",)], args.num_prompts)["prompt"]
    prompts = drop_long_prompts(prompts, tokenizer, args.max_prompt_length, f"'{args.prompts}'")

    # the models that stay loaded: the aligned model (the KL reference) and the reward model
    ref_model = load_model(str(aligned_dir), args.trust_remote_code, weights_dtype).to(device).eval()
    reward_model = load_model(args.reward_model, args.trust_remote_code, weights_dtype, scalar=True)
    reward_model = reward_model.to(device).eval()
    create_output_dir(out, args, device, dtype)
    print(f"expo: {len(args.alphas)} alphas x {len(prompts)} prompts ({args.prompts_split}), sft {args.sft}, "
          f"aligned {args.aligned}, reward model {args.reward_model}, device {device}, {dtype}")

    # Each alpha's checkpoint is written to disk and loaded from there, so the model evaluated is byte for
    # byte the model saved, and memory holds one extrapolated model at a time; only the best one is kept.
    rows, samples, best, best_dir = [], [], None, None
    for i, alpha in enumerate(args.alphas):
        # 1. extrapolate (Eq. 1), streamed through the shards
        start = time.time()
        alpha_dir = out / f".alpha-{i}"
        counts = extrapolate_checkpoint(sft_dir, aligned_dir, alpha_dir, alpha, args.trust_remote_code)
        extrapolate_s = time.time() - start

        # 2. sample the dev prompts, seeded identically for every alpha, and score them (App. E)
        policy = load_model(str(alpha_dir), args.trust_remote_code, weights_dtype).to(device).eval()
        torch.manual_seed(args.seed)
        start = time.time()
        metrics, alpha_samples = evaluate_samples(policy, ref_model, reward_model, tokenizer, prompts, args,
                                                  device, autocast, stop_ids)
        tokens = sum(s["length"] for s in alpha_samples)  # sampled tokens per second, scoring included
        row = {"alpha": alpha, **metrics, "perf/tokens_per_s": tokens / (time.time() - start),
               "perf/extrapolate_s": extrapolate_s}
        rows.append(row)
        samples += [{"alpha": alpha, **s} for s in alpha_samples]
        print(f"alpha={alpha:g} ({counts['extrapolated']} tensors extrapolated, {counts['copied']} copied): "
              + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "alpha"))
        del policy

        # 3. keep the alpha with the highest mean reward (App. E); the first one on a tie
        if best is None or row["eval/score"] > best["eval/score"]:
            if best_dir is not None:
                shutil.rmtree(best_dir)
            best, best_dir = row, alpha_dir
        else:
            shutil.rmtree(alpha_dir)

    # the chosen model moves into the output dir (file by file, as an atomic save does), with the table
    for f in best_dir.iterdir():
        os.replace(f, out / f.name)
    best_dir.rmdir()
    results = {"best_alpha": best["alpha"], "selected_by": "eval/score", "table": rows}
    with open(out / "eval.json", "w") as f:
        json.dump(results, f, indent=2)
    write_jsonl(out / "samples.jsonl", samples)
    print(f"\n{format_table(rows, best['alpha'])}\n\nbest alpha {best['alpha']:g}: model saved to {out}")
    return results


# ---- Plumbing --------------------------------------------------------------------------------------
# The same text in every script that uses it (tests/test_twins.py): arguments, data files, tokenizers,
# loading models, many processes, the run's folder, logs and checkpoints. Safe to skip on a first reading.


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


def write_jsonl(path: Path, rows: list) -> None:
    if rank() > 0:  # rank 0 writes
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def check_output_dir(args, script: str, models: list) -> Path:
    """Fails before any work if the run would overwrite another; sets args.output_dir. Writes nothing."""
    out = Path(args.output_dir or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.output_dir = str(out)
    if any(Path(locate(m)).resolve() == out.resolve() for m in models):
        raise SystemExit(f"error: output_dir '{out}' holds a model this run reads; choose another")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: output_dir '{out}' already holds a run; choose another --output_dir")
    return out


def create_output_dir(out: Path, args, device, dtype: str) -> None:
    """Writes args.json and the run's provenance."""
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


if __name__ == "__main__":
    main(tyro.cli(Args))
