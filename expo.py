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
2.2: a first-order step on the alignment objective). alpha = 0 is the aligned model, alpha = -1 the SFT
model, alpha in (-1, 0) interpolates between them. alpha is tuned like a decoding hyperparameter (App. E):
for each alpha of a grid, sample responses to dev prompts, score them with a reward model, keep the alpha
with the highest mean reward. The table also reports the sequence KL to the aligned model and the length,
which show how far each alpha moves the policy: a reward model can be gamed, and the alpha it prefers may
be past the point where the responses stay well-formed (on the toy, read the grammaticality of
samples.jsonl). The paper samples at temperature 0.7, top-k 40, top-p 0.9; here the samples are pure
(temperature 1 by default, and never the checkpoint's own sampling settings), so the KL estimate is
unbiased. Responses end at their first stop id and are scored at it.

Every floating tensor is extrapolated (embeddings, norms and lm_head too, as the authors do), integer
tensors are copied; a tensor identical in both models comes out unchanged at any alpha. The authors load
both models whole and do the arithmetic in bf16; here the checkpoint streams tensor by tensor through the
safetensors shards with fp32 arithmetic, cast back to the checkpoint's dtype, so the peak memory is about
one output shard (plus the largest tensor's inputs and fp32 result), whatever the model's size. The two
checkpoints must hold the same tensors with the same shapes (the paper's premise: theta_1 was trained from
theta_0; extrapolating unrelated models collapses them), checked before anything is computed. Their
floating dtypes may differ (an fp32 SFT model and a bf16 aligned one): both are upcast to fp32, and each
result is saved in the aligned checkpoint's dtype.

    python expo.py                      # the toy: toy/sft and toy/dpo, alpha chosen by toy/rm
    python expo.py --sft allenai/tulu-2-7b --aligned allenai/tulu-2-dpo-7b --reward_model runs/rm-tulu2 \
        --prompts trl-lib/ultrafeedback-prompt --prompts_split test --num_prompts 512 --alphas 0.1 0.3 0.5
    (runs/rm-tulu2: a reward model with Tulu 2's tokenizer, e.g. `reward_model.py --model allenai/tulu-2-7b`)
"""

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
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass
class Args:
    """ExPO: extrapolate an aligned model past itself, away from the SFT model it was trained from
    (theta_1 + alpha (theta_1 - theta_0)), for each alpha of a grid, with no training; sample dev prompts
    with each, score them with a reward model, and save the model of the best alpha. The defaults run the
    toy's pi_sft and pi_dpo in a few minutes on a CPU.

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

    # output
    output_dir: Optional[str] = None
    """where the run goes (default: runs/expo-<time>); must be empty unless --overwrite"""
    overwrite: bool = False
    """replace the contents of an existing, non-empty output_dir"""
    verbose: bool = False
    """show transformers' loading reports and progress bars"""

    # setup
    seed: int = 0
    """seed of the sampling, the same for every alpha so that rows are comparable"""
    device: str = "auto"
    """cuda, cpu, ... (auto: cuda when available)"""
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    """compute dtype of the evaluation: bfloat16 loads the models in bf16 and autocasts (log-probs stay
    fp32); default bf16 on CUDA. The extrapolation itself is always fp32, saved in the aligned checkpoint's
    dtype"""


def check_args(args: Args) -> None:
    """Every argument checked before anything is loaded or written: one line each, exit code 2."""
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
            raise UsageError(message)


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


def is_floating(dtype: str) -> bool:
    """Whether a safetensors dtype name (F32, BF16, F16, F8_E4M3, I64, BOOL, ...) is a floating type."""
    return dtype.startswith(("F", "BF"))


def checkpoint_mismatches(sft_specs: dict, aligned_specs: dict) -> list:
    """Why two checkpoints cannot be extrapolated, one line per tensor: present in only one of them, with
    another shape, or with another dtype unless both are floating (extrapolate upcasts those to fp32).
    specs map tensor names to (dtype, shape, shard file); the shard a tensor is stored in may differ
    between the two. Empty when they pair up."""
    problems = [f"{name}: only in the SFT checkpoint" for name in sft_specs if name not in aligned_specs]
    problems += [f"{name}: only in the aligned checkpoint" for name in aligned_specs if name not in sft_specs]
    for name in sorted(sft_specs.keys() & aligned_specs.keys()):
        (sft_dtype, sft_shape, _), (aligned_dtype, aligned_shape, _) = sft_specs[name], aligned_specs[name]
        both_floating = is_floating(sft_dtype) and is_floating(aligned_dtype)
        if sft_shape != aligned_shape or (sft_dtype != aligned_dtype and not both_floating):
            problems.append(f"{name}: {sft_dtype}{list(sft_shape)} in the SFT checkpoint, "
                            f"{aligned_dtype}{list(aligned_shape)} in the aligned one")
    return problems


DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def dtype_note(sft_specs: dict, aligned_specs: dict) -> Optional[str]:
    """One line when the checkpoints store tensors in different (floating) dtypes, None when they agree."""
    shared = sorted(sft_specs.keys() & aligned_specs.keys())
    pairs = [(sft_specs[n][0], aligned_specs[n][0]) for n in shared if sft_specs[n][0] != aligned_specs[n][0]]
    if not pairs:
        return None
    sft = "/".join(dict.fromkeys(DTYPE_NAMES.get(d, d) for d, _ in pairs))
    aligned = "/".join(dict.fromkeys(DTYPE_NAMES.get(d, d) for _, d in pairs))
    return (f"note: the SFT checkpoint is {sft} and the aligned one {aligned}: extrapolating in float32, "
            f"saving in {aligned}")


# ---- Checkpoints: streamed through their safetensors shards ---------------------------------------


def checkpoint_dir(name: str) -> Path:
    """The local folder of a model: a directory as it is; a hub id through the hub's cache (downloaded
    when online), fetching only what ExPO reads: safetensors weights, json configs, tokenizer files."""
    path = locate(name, "model")  # a path that does not exist fails here
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
    """Reads both checkpoints' headers and stops with every mismatch listed unless they pair up tensor by
    tensor: the same names and shapes (floating dtypes may differ: see checkpoint_mismatches). Returns
    (sft_specs, aligned_specs, aligned_shards, aligned_index)."""
    sft_specs, _, _ = read_checkpoint(sft_dir)
    aligned_specs, aligned_shards, aligned_index = read_checkpoint(aligned_dir)
    problems = checkpoint_mismatches(sft_specs, aligned_specs)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise SystemExit(f"error: the SFT checkpoint '{sft_dir}' and the aligned checkpoint '{aligned_dir}' "
                         f"differ in {len(problems)} tensors, so the aligned model was not trained from this "
                         f"SFT model (extrapolating unrelated models collapses them): {shown}")
    return sft_specs, aligned_specs, aligned_shards, aligned_index


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a shard. safe_open memory-maps the file and get_tensor returns a view of it: the pages
    read count as resident memory for as long as the file is open, so a shard held open while all its
    tensors are read costs the whole shard. Opening the file per tensor costs a header parse and keeps
    only the tensor in use mapped (the view keeps its mapping alive until it is freed)."""
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)


def extrapolate_checkpoint(sft_dir, aligned_dir, out_dir, alpha: float,
                           trust_remote_code: bool = False) -> dict:
    """Writes theta_2 (Eq. 1) of two safetensors checkpoints to out_dir, in the aligned checkpoint's shards
    (same file names, same tensors per shard, same header metadata) with its index, config, generation
    config and tokenizer: a directory that from_pretrained loads. Streams tensor by tensor: the peak memory
    is one output shard plus one tensor's inputs and fp32 result. Each tensor is saved in the aligned
    checkpoint's dtype, whatever the SFT checkpoint's (an fp32 SFT model with a bf16 aligned one gives a
    bf16 model). Checkpoints of models with tied weights store the shared tensor once, so it is
    extrapolated once. Atomic: written to out_dir/.saving, then moved into place. Returns the number of
    tensors extrapolated and copied."""
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
            aligned = read_tensor(aligned_dir / shard, name)
            sft = read_tensor(sft_dir / sft_specs[name][2], name)
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


# ---- Models: log-probs, sampling, scoring ---------------------------------------------------------


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 128) -> torch.Tensor:
    """Sum of the log-probs of the labelled tokens of each sequence under softmax(logits / T): gather
    minus logsumexp, in fp32, `chunk` positions at a time, so that the only vocabulary-sized tensor is
    the logits themselves in the model's dtype (an fp32 log-softmax of the whole block, at V = 152k,
    would outweigh the model). logits: (B, K, V); labels: (B, K), -100 where there is no label;
    position t predicts token t + 1. Returns (B,)."""
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
    """Summed response log-probs of each sequence of a collate_sequences batch (for pairs: chosen rows,
    then rejected), under logits / temperature, the distribution that sampling at that temperature
    draws from. The LM head runs only at the positions that predict a response token. Returns (B,),
    fp32."""
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=batch["labels"].shape[1]).logits
    return sequence_logps(logits, batch["labels"], temperature)


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
    """(prompt_ids, response_ids, ...) samples as one batch in which every response starts at the same
    column: prompts left-padded to the longest prompt P, responses right-padded to the longest
    response R. Log-probs then need the logits of the last R + 1 positions only (`logits_to_keep`;
    position P - 1 predicts the first response token), not those of the prompts and their padding.
    Positions count from each row's first token, so the padding changes no number.
    input_ids, attention_mask, position_ids: (B, P + R); labels: (B, R + 1), aligned with the kept
    logits: the response tokens in the last R columns, -100 elsewhere."""
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


# As in dpo.py, except that args.batch_size is the sampling batch itself (dpo.py samples 4 * its
# training batch of pairs).
@torch.no_grad()
def evaluate_samples(policy, ref_model, reward_model, tokenizer, prompts: list, args, device,
                     autocast, stop_ids: list) -> tuple:
    """Samples the policy at args.temperature, then scores each response with the reward model and
    measures log pi_T(y|x) - log pi_ref,T(y|x) (both from logits / T), whose mean over samples
    estimates KL(pi_T || pi_ref,T): the KL of what was sampled (at T = 1, of the models themselves)."""
    with autocast:  # sampled in the precision its log-probs are taken in
        samples = sample_responses(policy, tokenizer, prompts, args.max_new_tokens, args.temperature,
                                   args.batch_size, device, stop_ids)
    rows = []
    for i in range(0, len(samples), args.batch_size):
        chunk = samples[i : i + args.batch_size]
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


def format_table(rows: list, best_alpha: float) -> str:
    """The alpha search as a readable table, the chosen row marked."""
    lines = [f"{'alpha':>7}  {'score':>8} {'± se':>6}  {'kl':>7}  {'length':>6}  {'eos':>5}  {'tok/s':>7}"]
    for row in rows:
        mark = "  <- best" if row["alpha"] == best_alpha else ""
        lines.append(f"{row['alpha']:>7g}  {row['eval/score']:>8.3f} {row['eval/score_se']:>6.3f}  "
                     f"{row['eval/kl']:>7.3f}  {row['eval/length']:>6.1f}  {row['eval/eos_rate']:>5.2f}  "
                     f"{row['perf/tokens_per_s']:>7.0f}{mark}")
    return "\n".join(lines)


# ---- The alpha search -----------------------------------------------------------------------------


def main(args: Args) -> dict:
    # setup: every argument and the output dir checked before anything loads
    check_args(args)
    device, dtype, autocast = setup(args)
    weights_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32  # no training: no fp32 masters
    out = check_output_dir(args, "expo", [args.sft, args.aligned, args.reward_model], resume=None)

    # inputs, all checked before any compute: checkpoints that pair up, one tokenizer for the three models
    sft_dir, aligned_dir = checkpoint_dir(args.sft), checkpoint_dir(args.aligned)
    sft_specs, aligned_specs, _, _ = check_checkpoints(sft_dir, aligned_dir)
    note = dtype_note(sft_specs, aligned_specs)
    if note:
        print(note)
    tokenizer = load_tokenizer(args.aligned, args.trust_remote_code)
    stop_ids = stop_token_ids(tokenizer, args.aligned)
    check_tokenizers(tokenizer, args.aligned, [args.sft, args.reward_model], args.trust_remote_code)
    prompts = first(load_split(args.prompts, args.prompts_split, [("prompt",)]), args.num_prompts)["prompt"]
    prompts = drop_long_prompts(prompts, tokenizer, args.max_prompt_length, f"'{args.prompts}'")

    # the models that stay loaded: the aligned model (the KL reference) and the reward model
    ref_model = load_model(str(aligned_dir), args.trust_remote_code, weights_dtype).to(device).eval()
    reward_model = load_scalar_model(args.reward_model, tokenizer.pad_token_id, args.trust_remote_code,
                                     weights_dtype).to(device).eval()
    create_output_dir(out, args, device, dtype)
    print(f"expo: {len(args.alphas)} alphas x {len(prompts)} prompts ({args.prompts_split}), sft {args.sft}, "
          f"aligned {args.aligned}, reward model {args.reward_model}, device {device}, {dtype}")

    # Each alpha's checkpoint is written to disk by extrapolate_checkpoint and loaded from there, so the
    # model evaluated is byte for byte the model saved, and memory holds one extrapolated model at a time.
    # Only the best checkpoint so far is kept on disk.
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
# loading models, the run's folder, logs and checkpoints. Safe to skip on a first reading.


class UsageError(SystemExit):
    """A bad argument, found before any work: `cli` prints "error: <message>" and exits with code 2, as
    for a malformed command line (str() gives the message, for code that calls main directly)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = f"error: {message}"

    def __str__(self) -> str:
        return self.message


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


# ---- Many processes: setup() is the trainers' own (see sft.py: torchrun with FSDP2); expo.py itself
# runs as one process (check_args refuses torchrun: every process would repeat its work).


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


def write_jsonl(path: Path, rows: list) -> None:
    if rank() > 0:  # rank 0 writes
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


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


def last_checkpoint(out: Path) -> Optional[Path]:
    found = sorted(out.glob("checkpoint-*"))
    return found[-1] if found else None


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
