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
import random
import shutil
import sys
import time
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
    """where the run goes (default: runs/dera-<time>); must be empty unless --overwrite"""
    overwrite: bool = False
    """replace the contents of an existing, non-empty output_dir"""
    verbose: bool = False
    """show transformers' loading reports and progress bars"""
    seed: int = 0
    """seed of the sampling (the same for every lambda, so rows differ only by lambda)"""
    device: str = "auto"
    """cuda, cpu, ... (auto: cuda when available)"""
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    """weights' dtype (logits are mixed in fp32); default bf16 on CUDA, fp32 on CPU"""


def check_args(args: Args) -> None:
    """Every argument checked before anything is loaded or written: one line each, exit code 2."""
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
            raise UsageError(message)


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


def load_causal_lm(name: str, dtype, trust_remote_code: bool):
    """A causal LM (the reference or an aligned model); a reward model is refused before its weights load."""
    from transformers import AutoModelForCausalLM

    check_architecture(name, trust_remote_code, "ForCausalLM")
    try:
        return AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SystemExit(f"error: could not load model '{name}' (offline, or a wrong name?): {e}")


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
    prompts = first(load_split(args.prompts, args.prompts_split, [("prompt",)]), args.num_prompts)["prompt"]
    prompts = drop_long_prompts(prompts, tokenizer, args.max_prompt_length, f"'{args.prompts}'")

    ref = load_causal_lm(args.ref, dtype, args.trust_remote_code).to(device).eval()
    aligned = [load_causal_lm(name, dtype, args.trust_remote_code).to(device).eval() for name in args.aligned]
    check_compatible(ref, aligned, args.aligned, args.mode)
    reward_model = None
    if use_rm:
        reward_model = load_scalar_model(args.reward_model, tokenizer.pad_token_id, args.trust_remote_code,
                                         dtype).to(device).eval()
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
# loading models, the run's folder, logs and checkpoints. Safe to skip on a first reading.


class UsageError(SystemExit):
    """A bad argument, found before any work: `cli` prints "error: <message>" and exits with code 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = f"error: {message}"

    def __str__(self) -> str:  # the message, for code that calls main directly
        return self.message


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


def last_checkpoint(out: Path) -> Optional[Path]:
    return max(out.glob("checkpoint-*"), default=None)


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
