# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch==2.13.0",
#     "transformers==5.23.0",
#     "datasets==5.2.0",
#     "tyro==1.0.17",
# ]
# ///
"""Decoding-time realignment (DeRa): change the KL strength of an aligned model without retraining.

Liu et al. (2024), ICML. An aligned model pi_theta(beta), trained from pi_ref with KL strength beta,
approximates pi*(beta) = pi_ref exp(r / beta) / Z. The model realigned to strength beta / lambda,

    pi*(beta/lam)(y|x)  proportional to  pi_ref(y|x) [pi*(beta)(y|x) / pi_ref(y|x)]^lam         (Eq. 5)

is approximated token by token (Eq. 6), which Proposition 1 turns into a mixture of logits:

    pi_hat(. | x, y_<t) = softmax( lam * h_aligned + (1 - lam) * h_ref )                        (Eq. 9)

lam = 0 is the reference, lam = 1 the aligned model, lam > 1 a weaker KL than training used; several
aligned models mix as (1 - sum_i lam_i) h_ref + sum_i lam_i h_i (Appendix B). All models decode in one
loop (Algorithm 1), each with its own KV cache; the raw logits are mixed before temperature / top-k /
top-p, as in the authors' code. `--mode weights` mixes the parameters instead (Appendix D.5). Each lambda
gets a reward-model score, the sequence KL to the reference (the mean of log pi_hat(y|x) - log pi_ref(y|x)
from logits / temperature: unbiased without top-k / top-p), the length and the EOS rate.

    python dera.py                                    # the toy: toy/sft + toy/dpo, lambdas 0 0.5 1 2
    python dera.py --ref HuggingFaceH4/mistral-7b-sft-beta --aligned HuggingFaceH4/zephyr-7b-beta \
        --reward_model none --prompts my_prompts.jsonl --temperature 0.7 --top_k 50 --top_p 0.95
"""

import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
import tyro


@dataclass
class Args:
    """DeRa: realign an aligned model to other KL strengths by mixing its logits with the reference's
    (lambda 0: the reference, 1: the aligned model, above 1: a weaker KL); score each lambda's samples and
    report their KL to the reference. The defaults sweep the toy in a minute on a CPU.

    Example: python dera.py --ref HuggingFaceH4/mistral-7b-sft-beta --aligned HuggingFaceH4/zephyr-7b-beta
    --reward_model none --prompts my_prompts.jsonl --lambdas 0.5 1 2 --temperature 0.7 --top_k 50"""

    # models
    ref: str = "toy/sft"
    """hub id or local directory of the reference model pi_ref (usually the SFT model)"""
    aligned: list[str] = field(default_factory=lambda: ["toy/dpo"])
    """the aligned model(s) trained from the reference; several combine as in Appendix B"""
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])
    """realignment strengths to evaluate, one row each; with K aligned models give K numbers per row"""
    mode: Literal["logits", "weights"] = "logits"
    """logits: DeRa (Eq. 9, Algorithm 1); weights: combine parameters instead (Appendix D.5)"""
    reward_model: str = "toy/rm"
    """reward model that scores the samples ('none': skip scoring)"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""

    # data
    prompts: str = "toy/data/prompts"
    """prompt dataset (column `prompt`): hub name, directory of {split}.jsonl files, or a .jsonl file"""
    prompts_split: str = "validation"
    """its split: the dev set, where a lambda is chosen"""
    num_prompts: Optional[int] = None
    """use the first N prompts only (None: all)"""
    max_prompt_length: int = 1024
    """prompts longer than this many tokens, as the model sees them, are dropped and counted (L_p)"""

    # decoding
    max_new_tokens: int = 256
    """length limit of a response"""
    temperature: float = 1.0
    """sampling temperature applied after mixing (positive); the authors' demo uses 0.7"""
    top_k: int = 0
    """keep the k most likely tokens after mixing (0: all); the authors' demo uses 50"""
    top_p: float = 1.0
    """nucleus sampling after mixing (1.0: off); the authors' demo uses 0.95"""
    batch_size: int = 64
    """prompts decoded together"""

    # output and setup
    output_dir: Optional[str] = None
    """where the run goes (default: runs/dera-<time>); must be empty"""
    seed: int = 0
    """seed of the sampling (the same for every lambda, so rows differ only by lambda)"""
    device: str = "auto"
    """cuda, cpu, ... (auto: cuda when available)"""
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    """weights' dtype (logits are mixed in fp32); default bf16 on CUDA, fp32 on CPU"""


def check_args(args: Args) -> None:
    """Every argument checked before anything is loaded or written: one line each."""
    K = len(args.aligned)
    problems = [
        (args.max_prompt_length < 1,
         f"--max_prompt_length must be at least 1 (got {args.max_prompt_length})"),
        (int(os.environ.get("WORLD_SIZE", 1)) > 1,  # set by torchrun
         "dera.py runs as one process (it trains nothing to shard): start it with python, not torchrun"),
        (K == 0, "--aligned is empty; give at least one aligned model"),
        (K > 0 and (not args.lambdas or len(args.lambdas) % K),
         f"{len(args.lambdas)} lambdas for {K} aligned models; give {K} per row (one row at least)"),
        (any(lam < 0 for lam in args.lambdas),
         f"every lambda must be >= 0 (got {[lam for lam in args.lambdas if lam < 0]}): 0 is the reference, "
         "1 the aligned model, above 1 a weaker KL than training used"),
        (args.temperature <= 0, f"--temperature must be positive (got {args.temperature}); this script "
                                "samples, and its KL estimate needs the sampled distribution"),
        (args.top_k < 0, f"--top_k must be >= 0 (got {args.top_k}; 0 keeps every token)"),
        (not 0 < args.top_p <= 1, f"--top_p must be in (0, 1] (got {args.top_p}; 1 keeps every token)"),
        (args.max_new_tokens < 1, f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})"),
        (args.batch_size < 1, f"--batch_size must be at least 1 (got {args.batch_size})"),
        (args.num_prompts is not None and args.num_prompts < 1,
         f"--num_prompts must be at least 1 (got {args.num_prompts}; leave it out to use all prompts)"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


# ---- The method's maths ---------------------------------------------------------------------------


def realigned_logits(h_ref: torch.Tensor, h_aligned: Union[torch.Tensor, Sequence[torch.Tensor]],
                     lam: Union[float, Sequence[float]]) -> torch.Tensor:
    """Logits of the realigned model, in fp32. h_ref, h_aligned: (..., V) raw logits of the reference
    and the aligned model(s); lam: one strength per aligned model. softmax of the result is
    p_ref * prod_i (p_i / p_ref)^lam_i, normalised (Proposition 1)."""
    if isinstance(h_aligned, torch.Tensor):
        h_aligned, lam = [h_aligned], [lam]
    mixed = (1.0 - sum(lam)) * h_ref.float()  # Eq. 9; Appendix B for several aligned models
    for h, l in zip(h_aligned, lam):
        mixed = mixed + l * h.float()
    return mixed


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row from (B, V) logits: greedy at temperature 0, else temperature, then top-k,
    then top-p (the smallest set of tokens whose probability reaches top_p). Returns (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def dera_generate(ref, aligned, input_ids: torch.Tensor, attention_mask: torch.Tensor, lam,
                  max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  stop_ids: Sequence[int] = (), pad_token_id: int = 0,
                  generator: Optional[torch.Generator] = None) -> tuple:
    """Algorithm 1, batched: every model decodes with its own KV cache; the next token is drawn from
    the realigned logits (Eq. 9). `aligned` and `lam` may be lists (Appendix B); aligned = lam = [] is
    plain decoding of `ref`. input_ids, attention_mask: (B, T) left-padded prompts. Returns (tokens,
    realigned_logprobs, ref_logprobs), each (B, N), N <= max_new_tokens: after a row's first stop id its
    tokens are pad_token_id and their log-probs 0. Log-probs are of logits / T (before top-k / top-p)."""
    if not isinstance(aligned, (list, tuple)):
        aligned, lam = [aligned], [lam]
    models = [ref, *aligned]
    caches = [None] * len(models)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    step_ids = input_ids  # the prompt, then one new token per step on top of each model's cache
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    scale = temperature if temperature > 0 else 1.0  # log-probs of the tempered distributions sampled
    tokens, realigned_logprobs, ref_logprobs = [], [], []
    for _ in range(max_new_tokens):
        logits = []
        for i, model in enumerate(models):
            out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=positions,
                        past_key_values=caches[i], use_cache=True)
            caches[i] = out.past_key_values
            logits.append(out.logits[:, -1].float())
        h = realigned_logits(logits[0], logits[1:], lam)  # (B, V), Eq. 9
        token = sample_token(h, temperature, top_k, top_p, generator).masked_fill(finished, pad_token_id)
        tokens.append(token)
        for store, hh in ((realigned_logprobs, h), (ref_logprobs, logits[0])):
            logprobs = torch.log_softmax(hh / scale, -1)
            store.append(logprobs.gather(-1, token[:, None]).squeeze(-1).masked_fill(finished, 0.0))
        finished = finished | torch.isin(token, stops)
        if finished.all():
            break
        step_ids, positions = token[:, None], positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
    return torch.stack(tokens, 1), torch.stack(realigned_logprobs, 1), torch.stack(ref_logprobs, 1)


def combine_weights(ref, aligned: list, lam: list):
    """Appendix D.5: one model with parameters (1 - sum lam) theta_ref + sum_i lam_i theta_i, in fp32
    arithmetic (non-floating buffers are the reference's)."""
    states = [m.state_dict() for m in aligned]
    new_state = {}
    for name, t in ref.state_dict().items():
        new_state[name] = t
        if t.is_floating_point():
            mixed = (1.0 - sum(lam)) * t.float()
            for state, l in zip(states, lam):
                mixed = mixed + l * state[name].float()
            new_state[name] = mixed.to(t.dtype)
    combined = copy.deepcopy(ref)
    combined.load_state_dict(new_state)
    return combined.eval()


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


def check_compatible(ref, aligned: list, names: list, mode: str) -> None:
    """Logits can only be mixed over the same vocabulary; weights only between identical shapes."""
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for model, name in zip(aligned, names):
        if model.config.vocab_size != ref.config.vocab_size:
            raise SystemExit(f"error: '{name}' has {model.config.vocab_size} logits per token, the reference "
                             f"{ref.config.vocab_size}; DeRa mixes the logits of models with one vocabulary")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if mode == "weights" and shapes != ref_shapes:
            bad = sorted(k for k in set(shapes) | set(ref_shapes) if shapes.get(k) != ref_shapes.get(k))
            raise SystemExit(f"error: --mode weights needs identical architectures; '{name}' differs in "
                             f"{len(bad)} tensors, e.g. {bad[:5]}")


@torch.no_grad()
def decode_all(ref, aligned: list, lam: list, prompts: list, tokenizer, args, device,
               stop_ids: list) -> tuple:
    """Decodes every prompt; returns the samples as (prompt_ids, response_ids, finished) with their
    per-sequence log-ratio log pi_hat(y|x) - log pi_ref(y|x), and the generated tokens per second."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tokenizer.padding_side = "left"
    samples, logratios, n_tokens, start = [], [], 0, time.time()
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i : i + args.batch_size]
        batch = tokenizer([format_prompt(tokenizer, p) for p in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=not isinstance(chunk[0], list)).to(device)
        tokens, realigned_lp, ref_lp = dera_generate(
            ref, aligned, batch["input_ids"], batch["attention_mask"], lam, args.max_new_tokens,
            args.temperature, args.top_k, args.top_p, stop_ids, tokenizer.pad_token_id, generator)
        for row, mask, generated, lr in zip(batch["input_ids"], batch["attention_mask"], tokens.tolist(),
                                            (realigned_lp - ref_lp).sum(-1).tolist()):
            ends = [t for t, token in enumerate(generated) if token in stop_ids]
            samples.append((row[mask.bool()].tolist(), generated[: ends[0] + 1] if ends else generated,
                            bool(ends)))
            logratios.append(lr)
            n_tokens += len(generated)
    return samples, logratios, n_tokens / (time.time() - start)


@torch.no_grad()
def score_samples(reward_model, samples: list, pad_id: int, batch_size: int, device) -> list:
    """Reward-model scores of prompt + response token ids (the models share one tokenizer)."""
    scores = []
    for i in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in collate_sequences(samples[i : i + batch_size], pad_id).items()}
        scores += score(reward_model, batch["input_ids"], batch["attention_mask"]).tolist()
    return scores


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


def summarise(samples: list, logratios: list, scores: Optional[list]) -> dict:
    n = len(samples)
    row = {"eval/kl": sum(logratios) / n, "eval/length": sum(len(r) for _, r, _ in samples) / n,
           "eval/eos_rate": sum(f for _, _, f in samples) / n}
    if scores is not None:
        s = torch.tensor(scores)
        row.update({"eval/score": s.mean().item(), "eval/score_se": (s.std() / math.sqrt(n)).item()})
    return row


def print_table(rows: list) -> None:
    cols = [("lambda", "lambda"), ("eval/score", "score"), ("eval/score_se", "+-"), ("eval/kl", "KL(ref)"),
            ("eval/length", "length"), ("eval/eos_rate", "EOS rate"), ("perf/tokens_per_s", "tokens/s")]
    cols = [(k, name) for k, name in cols if k in rows[0]]
    print(" ".join(f"{name:>10}" for _, name in cols))
    for row in rows:
        print(" ".join(f"{row[k]:>10}" if isinstance(row[k], str) else f"{row[k]:>10.3f}" for k, _ in cols))


def main(args: Args) -> dict:
    # setup: every argument and the output dir checked before anything loads. From Python, one aligned
    # model or one lambda may be given bare; the command line always gives lists.
    if isinstance(args.aligned, str):
        args.aligned = [args.aligned]
    if isinstance(args.lambdas, (int, float)):
        args.lambdas = [float(args.lambdas)]
    check_args(args)
    device, dtype_name, _ = setup(args)  # no autocast: the models are loaded in the compute dtype
    dtype = getattr(torch, dtype_name)
    use_rm = args.reward_model.lower() != "none"
    scorers = [args.reward_model] if use_rm else []
    out = check_output_dir(args, "dera", [args.ref, *args.aligned, *scorers])

    # every tokenizer checked against the reference's, and every model's kind, before any weights load
    tokenizer = load_tokenizer(args.ref, args.trust_remote_code)
    stop_ids = stop_token_ids(tokenizer, args.ref)
    check_tokenizers(tokenizer, args.ref, args.aligned + scorers, args.trust_remote_code)
    for name in [args.ref, *args.aligned]:
        check_architecture(name, args.trust_remote_code, "ForCausalLM")
    for name in scorers:
        check_architecture(name, args.trust_remote_code, "ForSequenceClassification")
    prompts = load_split(args.prompts, args.prompts_split, [("prompt",)], args.num_prompts)["prompt"]
    prompts = drop_long_prompts(prompts, tokenizer, args.max_prompt_length, f"'{args.prompts}'")

    ref = load_model(args.ref, args.trust_remote_code, dtype).to(device).eval()
    aligned = [load_model(name, args.trust_remote_code, dtype).to(device).eval() for name in args.aligned]
    check_compatible(ref, aligned, args.aligned, args.mode)
    reward_model = None
    if use_rm:
        reward_model = load_model(args.reward_model, args.trust_remote_code, dtype, scalar=True)
        reward_model = reward_model.to(device).eval()
    create_output_dir(out, args, device, dtype_name)
    K = len(args.aligned)
    rows_lam = [args.lambdas[i : i + K] for i in range(0, len(args.lambdas), K)]
    print(f"dera: {len(prompts)} prompts, {len(rows_lam)} settings of lambda, mode {args.mode}, "
          f"device {device}")

    # one row per lambda: realigned samples (logits mode) or samples of the combined weights
    rows, all_samples, speeds = [], [], []
    for lam in rows_lam:
        if args.mode == "logits":
            samples, logratios, speed = decode_all(ref, aligned, lam, prompts, tokenizer, args, device,
                                                   stop_ids)
            speeds.append(speed)
        else:  # the combined model at lambda 1 samples exactly itself; the reference runs alongside only
            # to give log pi_ref for the KL (deployed alone, it costs one model's decoding)
            samples, logratios, speed = decode_all(ref, [combine_weights(ref, aligned, lam)], [1.0], prompts,
                                                   tokenizer, args, device, stop_ids)
        scores = (score_samples(reward_model, samples, tokenizer.pad_token_id, args.batch_size, device)
                  if use_rm else None)
        label = ",".join(f"{x:g}" for x in lam)
        rows.append({"lambda": label, **summarise(samples, logratios, scores), "perf/tokens_per_s": speed})
        for i, ((prompt_ids, response, finished), lr) in enumerate(zip(samples, logratios)):
            all_samples.append({"lambda": label, "prompt": prompts[i],
                                "response": tokenizer.decode(response, skip_special_tokens=True),
                                "score": scores[i] if scores else None, "logratio": lr,
                                "length": len(response), "finished": finished})
        print(f"lambda={label}: " + " ".join(f"{k}={v:.3f}" for k, v in rows[-1].items() if k != "lambda"))

    # the cost of DeRa: the same decoding loop with one model alone
    _, _, single_speed = decode_all(aligned[0], [], [], prompts, tokenizer, args, device, stop_ids)
    results = {"table": rows, "perf/tokens_per_s_one_model": single_speed}
    if speeds:
        results["perf/tokens_per_s"] = sum(speeds) / len(speeds)
        results["perf/slowdown_vs_one_model"] = single_speed / results["perf/tokens_per_s"]
    print()
    print_table(rows)
    print(f"\none model alone: {single_speed:.0f} tokens/s" +
          (f"; DeRa {results['perf/tokens_per_s']:.0f} tokens/s "
           f"({results['perf/slowdown_vs_one_model']:.2f}x slower)" if speeds else ""))
    with open(out / "eval.json", "w") as f:
        json.dump(results, f, indent=2)
    write_jsonl(out / "samples.jsonl", all_samples)
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
