"""Every check of every assignment, with its points. A check is a function of the graded module (the
student's whole script, imported) and a scratch folder; it fails by raising. Three levels:

1 unit:       each exercise against its paper's equation on small exact inputs, shapes and dtypes;
2 wiring:     the mistakes people make (a mean where the paper sums, padding counted, a missing
              detach, a softmax over the wrong axis, an overflow), each of which must lose points;
3 end to end: the whole file trains (or decodes) on the toy with short settings and must move the
              model the way the reference script does (thresholds from the reference's own runs,
              with margin).

Level-1/2 inputs are built so that every branch of the formula matters (a clip taken on both sides
and not taken elsewhere, padding that would change a mean), and each check names the wrong answers
it knows: close(..., wrong={mistake: its value}) fails on the reference too if the inputs stop
telling one from the answer, and tells a student which mistake their number is.

A teacher adds hidden checks with the same decorator in files of their own (grade.py --extra DIR)."""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {1: "unit", 2: "wiring", 3: "end to end"}


@dataclass
class Check:
    method: str
    level: int
    name: str
    points: int
    run: Callable


CHECKS: list = []


def check(method: str, level: int, points: int):
    """Registers the decorated function as a check; its docstring's first line is its name."""
    if level not in LEVELS:
        raise ValueError(f"check level {level} is not one of {sorted(LEVELS)}")

    def register(fn):
        CHECKS.append(Check(method, level, (fn.__doc__ or fn.__name__).strip().splitlines()[0], points, fn))
        return fn
    return register


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference; inf when the shapes differ, nan when either holds a nan."""
    if a.shape != b.shape:
        return math.inf
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def allowed(expected: torch.Tensor, tol: float) -> float:
    return tol * (1 + (expected.double().abs().max().item() if expected.numel() else 0.0))


def known(got, wrong: dict, tol: float) -> str:
    """' — that is <mistake>' when got is the value one of the known mistakes gives, else ''."""
    for mistake, value in wrong.items():
        value = torch.as_tensor(value)
        if gap(torch.as_tensor(got), value) <= allowed(value, tol):
            return f" — that is {mistake}"
    return ""


def armed(expected, wrong: dict, tol: float, what: str) -> None:
    """Each known mistake must give a value clearly off the answer (100 times the tolerance): else the
    inputs no longer arm the branch it breaks, and the check fails even on the reference."""
    expected = torch.as_tensor(expected)
    for mistake, value in wrong.items():
        assert gap(torch.as_tensor(value), expected) > 100 * allowed(expected, tol), \
            f"{what}: these inputs cannot tell {mistake} from the answer (the check is broken)"


def close(got, expected, tol=1e-5, what="result", wrong=None, arm=True):
    """got == expected up to tol, relative to expected's size. wrong: {a mistake: the value it gives on
    these inputs}, each armed() unless arm=False (an expected value computed by the student's own
    function, whose inputs the check arms itself); a got that is one of them is named in the message."""
    got, expected, wrong = torch.as_tensor(got), torch.as_tensor(expected), wrong or {}
    if arm:
        armed(expected, wrong, tol, what)
    that = known(got, wrong, tol)
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, not {tuple(expected.shape)}{that}"
    off = gap(got, expected)
    assert off <= allowed(expected, tol), f"{what}: off by {off:.3g}{that}"


def toy_args(m, **changes):
    """The script's own defaults with every toy path made absolute (a student's file may live anywhere)."""
    def absolute(value):
        if isinstance(value, str) and value.startswith("toy/"):
            return str(ROOT / value)
        return [absolute(v) for v in value] if isinstance(value, list) else value
    defaults = {f.name: absolute(getattr(m.Args(), f.name)) for f in dataclasses.fields(m.Args)}
    # the thresholds come from fp32 runs on a CPU: a GPU's bf16 would move them
    return m.Args(**{**defaults, "device": "cpu", "dtype": "float32", **changes})


def gold(rows: list) -> float:
    """The toy's gold reward, averaged over sampled rows {prompt, response}."""
    from toy.make import gold_reward

    return sum(gold_reward(r["prompt"][-1]["content"], r["response"]) for r in rows) / len(rows)


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in open(path)]


def plain_token_logps(logits, labels, temperature=1.0, shift=True):
    """The formula itself, per position: log softmax(logits[t - 1] / T)[labels[t]] (every position,
    labelled or not), and the mask of labelled positions. shift=False scores position t on token t."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logprobs = torch.log_softmax(logits.double() / temperature, -1)
    return logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), labels != -100


def plain_sequence_logps(logits, labels, temperature=1.0):
    """The sum over labelled t of log softmax(logits[t - 1] / T)[labels[t]], per sequence."""
    picked, labelled = plain_token_logps(logits, labels, temperature)
    return (picked * labelled).sum(1)


def random_lm_batch(B=3, K=9, V=13, seed=0, padded=True):
    """Logits and labels; padded=False labels every position, so that a check of the formula cannot
    also charge a mask ignored (the padding check's mistake)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, V, generator=g) * 3
    labels = torch.randint(0, V, (B, K), generator=g)
    if padded:
        labels[:, :3] = -100  # a prompt
        labels[0, -2:] = -100  # padding
    return logits, labels


def lm_mistakes(logits, labels, temperature=1.0) -> dict:
    """What the usual mistakes give per sequence: a mean, no shift, no mask, the softmax over positions,
    no temperature."""
    picked, labelled = plain_token_logps(logits, labels, temperature)
    unshifted, unshifted_labelled = plain_token_logps(logits, labels, temperature, shift=False)
    over_positions = torch.log_softmax(logits[:, :-1].double() / temperature, 1)
    over_positions = over_positions.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    mistakes = {"a token mean where the paper sums": (picked * labelled).sum(1) / labelled.sum(1),
                "no shift (position t scored on token t, not t + 1)": (unshifted * unshifted_labelled).sum(1),
                "the log-softmax over positions, not the vocabulary": (over_positions * labelled).sum(1)}
    if not labelled.all():
        mistakes["prompt and padding counted (the mask ignored)"] = picked.sum(1)
    if temperature != 1.0:
        mistakes["the temperature ignored"] = plain_sequence_logps(logits, labels)
    return mistakes


# chunk=3 over the 8 shifted positions of random_lm_batch leaves a partial last chunk (positions 6, 7)
TAIL = "the last, partial chunk dropped (the loop stops before the tail)"


def without_tail(logits, labels):
    picked, labelled = plain_token_logps(logits, labels)
    return (picked * labelled)[:, :6].sum(1)


# ---- sft -----------------------------------------------------------------------------------------


@check("sft", 1, 6)
def sft_loss_matches_the_formula(m, tmp):
    """sft_loss_sum: the summed NLL of the labelled tokens, position t predicting token t + 1"""
    logits, labels = random_lm_batch(padded=False)  # the mask is sft_loss_ignores_prompt_and_padding's
    expected = -plain_sequence_logps(logits, labels).sum()
    wrong = {mistake: -logps.sum() for mistake, logps in lm_mistakes(logits, labels).items()}
    del wrong["a token mean where the paper sums"]  # per sequence; sft_loss_sum sums over the batch
    wrong["a token mean, not the sum"] = expected / (labels[:, 1:] != -100).sum()
    wrong["the log-likelihood, not its negative"] = -expected
    close(m.sft_loss_sum(logits, labels), expected, what="loss", wrong=wrong)
    close(m.sft_loss_sum(logits, labels, chunk=3), expected, what="loss with chunk=3",
          wrong={**wrong, TAIL: -without_tail(logits, labels).sum()})


@check("sft", 1, 2)
def sft_loss_is_fp32_from_bf16_logits(m, tmp):
    """sft_loss_sum: a scalar in fp32 from bf16 logits, the loss of the same logits in fp32"""
    logits, labels = random_lm_batch()
    loss = m.sft_loss_sum(logits.bfloat16(), labels)
    assert loss.dtype in (torch.float32, torch.float64), f"the loss in {loss.dtype}, not fp32"
    assert loss.dim() == 0, f"the loss has shape {tuple(loss.shape)}, not a scalar"
    # against the student's own loss of the same values in fp32: a wrong formula is the other check's
    close(loss, m.sft_loss_sum(logits.bfloat16().float(), labels), tol=1e-4, arm=False,
          what="loss from bf16 logits, against your loss of the same logits in fp32 (is the log-softmax "
               "computed in fp32?)")


@check("sft", 2, 2)
def sft_loss_ignores_prompt_and_padding(m, tmp):
    """sft_loss_sum: prompt and padding positions (label -100) carry no loss"""
    logits, labels = random_lm_batch()
    moved = logits.clone()
    # these positions predict tokens labelled -100 (a different move per token: a constant one is
    # invisible to a log-softmax)
    moved[:, :2] += 5 * torch.randn(moved[:, :2].shape, generator=torch.Generator().manual_seed(8))
    counted = -plain_token_logps(moved, labels)[0].sum()
    armed(-plain_sequence_logps(logits, labels).sum(), {"prompt and padding counted": counted}, 1e-5, "loss after moving them")
    close(m.sft_loss_sum(moved, labels), m.sft_loss_sum(logits, labels), what="loss after moving them",
          arm=False, wrong={"prompt and padding counted (the mask ignored)": counted})


@check("sft", 3, 5)
def sft_trains_from_scratch(m, tmp):
    """end to end: 60 steps from random weights cut the held-out loss by more than 0.5 nats"""
    m.main(toy_args(m, output_dir=str(tmp / "sft"), max_steps=60, batch_size=16, max_train_samples=960,
                    max_eval_samples=64, eval_every=10, log_every=10, num_samples=0))
    evals = [r["eval/loss"] for r in read_jsonl(tmp / "sft" / "metrics.jsonl") if "eval/loss" in r]
    assert evals[-1] < evals[0] - 0.5, f"held-out loss {evals[0]:.3f} -> {evals[-1]:.3f}"


# ---- reward model --------------------------------------------------------------------------------


@check("reward_model", 1, 4)
def bt_loss_matches_eq_1(m, tmp):
    """bradley_terry_loss: -log sigmoid(r_c - r_r) per pair (Tulu 2.5 Eq. 1)"""
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0, 0.0]), torch.tensor([0.0, 0.5, -1.0, 0.0])
    close(m.bradley_terry_loss(chosen, rejected), -F.logsigmoid(chosen - rejected), what="losses",
          wrong={"chosen and rejected swapped": -F.logsigmoid(rejected - chosen),
                 "log sigmoid, not its negative": F.logsigmoid(chosen - rejected),
                 "a mean over pairs, not one loss per pair": -F.logsigmoid(chosen - rejected).mean()})
    close(m.bradley_terry_loss(torch.zeros(2), torch.zeros(2)), torch.full((2,), math.log(2)),
          what="losses at equal rewards")


def saturates(losses, grad, size: float, what: str) -> None:
    """Losses at margins of +-size: finite, with a finite gradient, one of them about 0 and the other
    about size. Which is which is the orientation, the unit check's to charge; a loss that overflows,
    or a clamped probability that stops growing (and stops learning), is this check's."""
    assert torch.isfinite(losses).all(), \
        f"{what}: losses {losses.tolist()}: log(sigmoid(x)) is log(0) in fp32 at x = -{size:g}; " \
        "F.logsigmoid (or softplus, or a BCE/cross-entropy with logits) stays finite"
    assert grad is not None and torch.isfinite(grad).all(), \
        f"{what}: the gradient {None if grad is None else grad.tolist()} is not finite"
    close(losses.detach().abs().sort().values, torch.tensor([0.0, size]), tol=1e-4, arm=False,
          what=f"{what}: |losses| (a stable loss is about 0 at one and {size:g} at the other)")


@check("reward_model", 2, 2)
def bt_loss_is_stable_at_large_margins(m, tmp):
    """bradley_terry_loss: finite loss and gradient at margins of +-100 (log(sigmoid(x)) overflows)"""
    chosen = torch.tensor([100.0, -100.0], requires_grad=True)
    losses = m.bradley_terry_loss(chosen, torch.zeros(2))
    grad = torch.autograd.grad(losses.sum(), chosen)[0] if losses.requires_grad else None
    saturates(losses, grad, 100.0, "margins 100 and -100")


@check("reward_model", 1, 3)
def last_token_with_right_padding(m, tmp):
    """last_token_index: the last attended position of right-padded rows"""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    close(m.last_token_index(mask), torch.tensor([2, 4, 0]), tol=0, what="indices",
          wrong={"the first attended position": torch.tensor([0, 0, 0]),
                 "the count of attended positions (one past the last)": mask.sum(1)})


@check("reward_model", 2, 3)
def last_token_with_left_padding(m, tmp):
    """last_token_index: rows padded on the left or on both sides (mask.sum(1) - 1 assumes the right)"""
    # one attended token per row: its first position is its last, so taking the first attended
    # position, the right-padding check's mistake, cannot be charged again here
    mask = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    close(m.last_token_index(mask), torch.tensor([4, 2, 1, 0]), tol=0, what="indices",
          wrong={"mask.sum(1) - 1, right for right padding only": mask.sum(1) - 1})


@check("reward_model", 3, 5)
def reward_model_learns_preferences(m, tmp):
    """end to end: 60 steps from toy/sft rank held-out pairs well above chance (> 62%)"""
    results = m.main(toy_args(m, output_dir=str(tmp / "rm"), max_steps=60, batch_size=16, learning_rate=1e-3,
                              max_train_samples=960, max_eval_samples=256, eval_every=0, log_every=10))
    assert results["eval/accuracy"] > 0.62, results["eval/accuracy"]


# ---- dpo -----------------------------------------------------------------------------------------


def pair_logps():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, generator=g) * 4 - 20 for _ in range(4)]


def all_of(*checks) -> None:
    """Runs every check (a function that asserts) and fails once, with all their messages."""
    failures = []
    for run in checks:
        try:
            run()
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "; ".join(failures)


@check("dpo", 1, 4)
def dpo_loss_matches_eq_3(m, tmp):
    """dpo_loss: -log sigmoid(beta h), h = (pi_c - ref_c) - (pi_r - ref_r), and rewards beta (pi - ref)"""
    pc, pr, rc, rr = pair_logps()
    h = (pc - rc) - (pr - rr)
    losses, chosen, rejected = m.dpo_loss(pc, pr, rc, rr, 0.3)
    # the rewards tell which swap flipped h's sign: policy and reference flip them, chosen and rejected not
    swapped = "policy and reference swapped: beta (log pi_ref - log pi)"
    all_of(lambda: close(losses, -F.logsigmoid(0.3 * h), what="losses",
                         wrong={"beta outside the sigmoid": -0.3 * F.logsigmoid(h),
                                "h's sign flipped: chosen and rejected (or policy and reference) swapped":
                                    -F.logsigmoid(-0.3 * h),
                                "the reference ignored": -F.logsigmoid(0.3 * (pc - pr))}),
           lambda: close(chosen, 0.3 * (pc - rc), what="chosen rewards",
                         wrong={"beta missing": pc - rc, "the reference ignored": 0.3 * pc,
                                swapped: 0.3 * (rc - pc), "the rejected rewards": 0.3 * (pr - rr)}),
           lambda: close(rejected, 0.3 * (pr - rr), what="rejected rewards",
                         wrong={"beta missing": pr - rr, "the reference ignored": 0.3 * pr,
                                swapped: 0.3 * (rr - pr), "the chosen rewards": 0.3 * (pc - rc)}))


@check("dpo", 1, 1)
def dpo_loss_label_smoothing(m, tmp):
    """dpo_loss: conservative DPO, -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)"""
    pc, pr, rc, rr = pair_logps()
    h, eps = (pc - rc) - (pr - rr), 0.2
    plain, flipped = -F.logsigmoid(0.3 * h), -F.logsigmoid(-0.3 * h)

    def mistakes(L, L_flipped):
        return {"the smoothing ignored": L,
                "eps and 1 - eps swapped": eps * L + (1 - eps) * L_flipped,
                "the eps term's sign flipped: -(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)":
                    (1 - eps) * L - eps * L_flipped}

    armed((1 - eps) * plain + eps * flipped, mistakes(plain, flipped), 1e-5, "smoothed losses")
    # against the student's own eps = 0 losses at h and at -h (chosen and rejected exchanged): a wrong
    # -log sigmoid(beta h) is dpo_loss_matches_eq_3's to charge, not this check's
    own, own_flipped = m.dpo_loss(pc, pr, rc, rr, 0.3)[0], m.dpo_loss(pr, pc, rr, rc, 0.3)[0]
    assert gap(own, own_flipped) > 1e-3, "your eps = 0 losses are the same at h and at -h: fix them first"
    close(m.dpo_loss(pc, pr, rc, rr, 0.3, label_smoothing=eps)[0], (1 - eps) * own + eps * own_flipped,
          arm=False, what="smoothed losses, against (1 - eps) L(h) + eps L(-h) from your eps = 0 losses",
          wrong=mistakes(own, own_flipped))


@check("dpo", 1, 1)
def dpo_loss_ipo(m, tmp):
    """dpo_loss: IPO's squared loss (h - 1 / (2 beta))^2 (Azar et al. Eq. 17)"""
    pc, pr, _, _ = pair_logps()
    ref = torch.full_like(pc, -20.0)  # equal references: ignoring them is the first check's mistake
    h = pc - pr
    got = m.dpo_loss(pc, pr, ref, ref, 0.3, loss_type="ipo")[0]
    mirrored = (-h - 1 / 0.6) ** 2  # h's sign flipped, dpo_loss_matches_eq_3's to charge
    if torch.as_tensor(got).shape == mirrored.shape and gap(got, mirrored) <= allowed(mirrored, 1e-5):
        return
    close(got, (h - 1 / 0.6) ** 2, what="IPO losses",
          wrong={"1 / beta where IPO has 1 / (2 beta)": (h - 1 / 0.3) ** 2,
                 "beta h inside the square, where IPO has h": (0.3 * h - 1 / 0.6) ** 2,
                 "(beta h - 1/2)^2, which is beta^2 times IPO's (h - 1 / (2 beta))^2": (0.3 * h - 0.5) ** 2})


@check("dpo", 2, 2)
def dpo_loss_is_stable_at_large_margins(m, tmp):
    """dpo_loss: finite loss and gradient at beta h = +-200 (log(sigmoid(x)) overflows; logsigmoid not)"""
    pc = torch.tensor([-10.0, -2010.0], requires_grad=True)
    pr, ref = torch.tensor([-2010.0, -10.0]), torch.full((2,), -50.0)  # h = +-2000, beta 0.1
    losses = m.dpo_loss(pc, pr, ref, ref, 0.1)[0]
    grad = torch.autograd.grad(losses.sum(), pc)[0] if losses.requires_grad else None
    saturates(losses, grad, 200.0, "beta h = 200 and -200")


@check("dpo", 2, 2)
def dpo_rewards_are_detached(m, tmp):
    """dpo_loss: the implicit rewards are detached (they are logged, not trained)"""
    pc, pr, rc, rr = pair_logps()
    pc.requires_grad_(True)
    losses, chosen, rejected = m.dpo_loss(pc, pr, rc, rr, 0.1)
    assert losses.requires_grad, "the losses carry no gradient"
    assert not chosen.requires_grad and not rejected.requires_grad, "the rewards carry a gradient: detach"


@check("dpo", 1, 4)
def sequence_logps_matches_the_formula(m, tmp):
    """sequence_logps: summed log-probs of the labelled tokens, under logits / T, per sequence"""
    logits, labels = random_lm_batch(padded=False)  # the mask is sequence_logps_skips_prompt_and_padding's
    expected = plain_sequence_logps(logits, labels)
    close(m.sequence_logps(logits, labels), expected, what="logps", wrong=lm_mistakes(logits, labels))
    close(m.sequence_logps(logits, labels, chunk=3), expected, what="logps with chunk=3",
          wrong={**lm_mistakes(logits, labels), TAIL: without_tail(logits, labels)})
    close(m.sequence_logps(logits, labels, temperature=0.7), plain_sequence_logps(logits, labels, 0.7),
          what="logps at T = 0.7", wrong=lm_mistakes(logits, labels, 0.7))


@check("dpo", 2, 1)
def sequence_logps_skips_prompt_and_padding(m, tmp):
    """sequence_logps: prompt and padding positions (label -100) add nothing"""
    logits, labels = random_lm_batch()
    moved = logits.clone()
    # positions that predict a -100 label (a different move per token: a constant one is invisible)
    moved[:, :2] -= 7 * torch.randn(moved[:, :2].shape, generator=torch.Generator().manual_seed(8))
    counted = plain_token_logps(moved, labels)[0].sum(1)
    armed(plain_sequence_logps(logits, labels), {"prompt and padding counted": counted}, 1e-5, "logps")
    # against the student's own logps of the unmoved logits: a wrong formula is the other check's
    close(m.sequence_logps(moved, labels), m.sequence_logps(logits, labels), arm=False,
          what="logps after moving the logits of unlabelled positions",
          wrong={"prompt and padding counted (the mask ignored)": counted})


@check("dpo", 2, 1)
def sequence_logps_in_fp32(m, tmp):
    """sequence_logps: fp32 logps from bf16 logits, those of the same logits in fp32"""
    logits, labels = random_lm_batch()
    got = m.sequence_logps(logits.bfloat16(), labels)
    assert got.dtype in (torch.float32, torch.float64), f"logps in {got.dtype}, not fp32"
    close(got, m.sequence_logps(logits.bfloat16().float(), labels), tol=1e-4, arm=False,
          what="logps from bf16 logits, against your logps of the same logits in fp32 (a bf16 log-softmax?)")


@check("dpo", 3, 6)
def dpo_raises_the_gold_reward(m, tmp):
    """end to end: 40 steps from toy/sft raise the gold reward of samples and rank held-out pairs"""
    results = m.main(toy_args(m, output_dir=str(tmp / "dpo"), max_steps=40, batch_size=16,
                              max_train_samples=640, max_eval_samples=256, learning_rate=3e-4, log_every=10,
                              num_eval_prompts=64, max_new_tokens=48, sample_every=40))
    before = gold(read_jsonl(tmp / "dpo" / "samples" / "step_000000.jsonl"))
    after = gold(read_jsonl(tmp / "dpo" / "samples.jsonl"))
    assert results["eval/rewards/accuracy"] > 0.6, results["eval/rewards/accuracy"]
    assert after > before + 0.5, f"gold {before:.2f} -> {after:.2f}"


# ---- ppo -----------------------------------------------------------------------------------------


def episodes(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).float()
    logprobs, ref_logprobs, values = (torch.randn(3, 6, generator=g) for _ in range(3))
    return mask, logprobs, ref_logprobs, values, torch.tensor([1.5, -0.5, 2.0])


def masked(x, mask):
    return (x * mask).sum() / mask.sum()


@check("ppo", 1, 3)
def eos_trick_replaces_unfinished_scores(m, tmp):
    """eos_trick: an unfinished response scores exactly the penalty (any); a finished one keeps its score"""
    scores, finished = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([True, False, True])
    close(m.eos_trick(scores, finished, -10.0), torch.tensor([1.0, -10.0, -3.0]), what="scores",
          wrong={"no EOS trick (the scores as they are)": scores,
                 "the penalty added to the score, not in its place": torch.tensor([1.0, -8.0, -3.0]),
                 "the penalty on the finished responses": torch.tensor([-10.0, 2.0, -10.0])})
    close(m.eos_trick(scores, finished, -3.5), torch.tensor([1.0, -3.5, -3.0]), what="scores at penalty -3.5",
          wrong={"the penalty fixed at -10 (the penalty argument ignored)": torch.tensor([1.0, -10.0, -3.0]),
                 "no EOS trick (the scores as they are)": scores,
                 "the penalty added to the score, not in its place": torch.tensor([1.0, -1.5, -3.0])})


@check("ppo", 1, 4)
def kl_rewards_match_eq_4(m, tmp):
    """kl_penalized_rewards: -beta (log pi - log pi_ref) per token, plus the score at the last token"""
    mask, logprobs, ref_logprobs, _, scores = episodes()
    kl, last = logprobs - ref_logprobs, mask.sum(1).long() - 1

    def scored(rewards, at):
        rewards = rewards.clone()
        rewards[torch.arange(3), at] += scores
        return rewards

    per_token, rows = -0.2 * kl * mask, torch.arange(3)
    summed_at_last = torch.zeros(3, 6)
    summed_at_last[rows, last] = per_token.sum(1)
    own_at_last = torch.zeros(3, 6)
    own_at_last[rows, last] = per_token[rows, last]
    close(m.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, 0.2), scored(per_token, last),
          what="rewards", wrong={"beta missing": scored(-kl * mask, last),
                                 "the sign flipped (the KL rewarded)": scored(0.2 * kl * mask, last),
                                 "the score at the padded row's last position": scored(per_token, 5),
                                 "the score one token early (at the last token - 1)": scored(per_token, last - 1),
                                 "the score one token late (after the last token)":
                                     scored(per_token, (last + 1).clamp(max=5)),
                                 "the KL penalty at the last token only (summed there, none per token)":
                                     scored(summed_at_last, last),
                                 "the KL penalty at the last token only (that token's own)":
                                     scored(own_at_last, last),
                                 "the KL penalty twice: per token and again, summed, at the last token":
                                     scored(per_token + summed_at_last, last),
                                 "the mask dropped (a KL penalty after the end)": scored(-0.2 * kl, last)})


def plain_gae(rewards, values, mask, gamma, lam, forwards=False):
    """The recursion episode by episode, in plain Python; the episode ends after its n tokens.
    forwards=True runs it from the first token (A_t from A_{t-1}): the mistake, not GAE."""
    advantages = torch.zeros_like(rewards)
    for i in range(len(rewards)):
        n, following = int(mask[i].sum()), 0.0
        for t in (range(n) if forwards else reversed(range(n))):
            next_value = values[i, t + 1].item() if t + 1 < n else 0.0
            following = rewards[i, t] + gamma * next_value - values[i, t] + gamma * lam * following
            advantages[i, t] = following
    return advantages


@check("ppo", 1, 5)
def gae_matches_the_recursion(m, tmp):
    """compute_gae: A_t = delta_t + gamma lam A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t; G = A + V"""
    mask, _, _, values, _ = episodes()
    rewards = torch.randn(3, 6, generator=torch.Generator().manual_seed(3)) * mask
    values = values * mask
    advantages, returns = m.compute_gae(rewards, values, mask, 0.9, 0.8)
    expected = plain_gae(rewards, values, mask, 0.9, 0.8)
    close(advantages, expected, what="advantages",
          wrong={"lambda missing (gamma alone in the recursion)": plain_gae(rewards, values, mask, 0.9, 1.0),
                 "gamma and lambda swapped": plain_gae(rewards, values, mask, 0.8, 0.9),
                 "GAE run forwards (A_t from A_{t-1}; it runs backwards, from A_{t+1})":
                     plain_gae(rewards, values, mask, 0.9, 0.8, forwards=True)})
    close(returns, (expected + values) * mask, what="returns", wrong={"the advantages, not A + V": expected})


@check("ppo", 2, 2)
def gae_does_not_bootstrap_past_the_end(m, tmp):
    """compute_gae: the value after a response's last token is 0, whatever the padding holds"""
    mask, _, _, values, _ = episodes()
    rewards = torch.zeros(3, 6)
    padded = values * mask + (1 - mask) * 50.0  # garbage after the end
    advantages, returns = m.compute_gae(rewards, padded, mask, 1.0, 0.95)
    clean_advantages, clean_returns = m.compute_gae(rewards, values * mask, mask, 1.0, 0.95)
    close(advantages, clean_advantages, what="advantages with garbage values after the end (V there is 0)")
    close(returns, clean_returns, what="returns with garbage values after the end (G is 0 there)")


def policy_case():
    """Ratios above 1 + eps and below 1 - eps, each with advantages of both signs, and some inside:
    at eps = 0.2 the clipped branch is taken where nu > 1.2 and A > 0 (3 tokens) or nu < 0.8 and A < 0
    (2), and not on the other 3 outside the range nor the 4 inside. Every padding position would take it."""
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).float()
    ratio = torch.tensor([[1.6, 0.5, 1.1, 1.5, 1.7, 0.4],
                          [1.4, 0.6, 0.95, 0.7, 1.3, 1.05],
                          [1.35, 0.9, 1.8, 0.3, 1.5, 0.45]])
    advantages = torch.tensor([[1.0, -0.8, 0.7, -1.2, 2.0, -2.0],
                               [0.9, 1.3, -0.6, -1.1, 1.5, -0.4],
                               [-0.5, 0.3, 1.0, -1.0, 0.5, -0.7]])
    logprobs = -torch.rand(3, 6, generator=torch.Generator().manual_seed(5)) * 3
    return mask, logprobs, logprobs - ratio.log(), advantages


def surrogate(ratio, advantages, low=0.8, high=1.2, pick=torch.max):
    """Per token, the negated clipped surrogate; low or high None leaves that side unclipped."""
    return pick(-advantages * ratio, -advantages * ratio.clamp(low, high))


@check("ppo", 1, 4)
def policy_loss_matches_eq_5(m, tmp):
    """ppo_policy_loss: -E_t min(nu A, clip(nu, 1 - eps, 1 + eps) A), nu = pi / pi_old, over tokens"""
    mask, logprobs, old, advantages = policy_case()
    ratio = torch.exp(logprobs - old)
    per_token = surrogate(ratio, advantages)
    loss, _ = m.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    close(loss, masked(per_token, mask), what="loss", wrong={
        "no clipping (-A nu alone)": masked(-advantages * ratio, mask),
        "the clipped term alone (no max with the unclipped -A nu)":
            masked(-advantages * ratio.clamp(0.8, 1.2), mask),
        "nu clipped above only (at 1 + eps)": masked(surrogate(ratio, advantages, low=None), mask),
        "nu clipped below only (at 1 - eps)": masked(surrogate(ratio, advantages, high=None), mask),
        "min where the pessimistic bound takes max": masked(surrogate(ratio, advantages, pick=torch.min),
                                                            mask),
        "padding counted in the mean": (per_token * mask).mean(),
        "a sum where the paper takes a mean": (per_token * mask).sum(),
        "a mean of per-sequence means (rows weighted, not tokens)": ((per_token * mask).sum(1)
                                                                       / mask.sum(1)).mean()})


def fraction_check(what, clipfrac, loss, mask, variants: dict, wrong: dict) -> None:
    """A clip fraction is one of the readings of the clipping the loss does. variants: {a way of
    clipping: (the loss it gives, {a reading: the fraction it gives})}, the answer first. The answer's
    readings are always accepted; a loss clipped another known way (the loss check's mistake to charge)
    also has the readings of its own clipping accepted, so that one mistake costs once."""
    readings = dict(variants["answer"][1])
    for way, (value, its_readings) in variants.items():
        if gap(torch.as_tensor(loss).detach(), value) <= allowed(value, 1e-5):
            readings.update({f"{reading}, of {way}": v for reading, v in its_readings.items()})
    answer = variants["answer"][1]
    armed(next(iter(answer.values())), {**wrong, **{f"the '{r}' reading": v for r, v in list(answer.items())[1:]}},
          1e-6, what)
    for value in list(answer.values())[1:]:
        armed(value, wrong, 1e-6, what)
    clipfrac = torch.as_tensor(clipfrac).detach()
    expected = " or ".join(f"{float(v):.4g} ({r})" for r, v in answer.items())
    assert any(gap(clipfrac, v) <= 1e-6 for v in readings.values()), (
        f"{what} {float(clipfrac) if clipfrac.numel() == 1 else clipfrac.tolist()}, expected {expected}"
        f"{known(clipfrac, wrong, 1e-6)}")


def fraction_mistakes(taken, ties, mask) -> dict:
    """The clip fractions of the usual mistakes, from the per-token branch taken (and >= for ties)."""
    return {"0": 0.0, "1": 1.0, "1 - the fraction taken": 1 - masked(taken, mask),
            "a count over response tokens divided by every position": (taken * mask).mean(),
            "padding counted as tokens (its clipped branches too)": taken.mean(),
            "ties counted as clipped (>=: every token inside the range too)": masked(ties, mask)}


@check("ppo", 1, 1)
def policy_loss_clip_fraction(m, tmp):
    """ppo_policy_loss: the fraction of response tokens where the clipped branch is taken"""
    mask, logprobs, old, advantages = policy_case()
    ratio = torch.exp(logprobs - old)
    loss, clipfrac = m.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    unclipped = -advantages * ratio

    def way(low, high):
        clipped = -advantages * ratio.clamp(low, high)
        outside = ((ratio > 1.2) if high else torch.zeros_like(mask).bool()) | (
            (ratio < 0.8) if low else torch.zeros_like(mask).bool())
        readings = {"the clipped branch taken": masked((clipped > unclipped).float(), mask),
                    "the ratio outside the range (CleanRL's reading)": masked(outside.float(), mask)}
        return masked(torch.max(unclipped, clipped), mask), readings

    # both readings are in use: the branch taken (the reference), or any ratio outside (CleanRL's)
    clipped = -advantages * ratio.clamp(0.8, 1.2)
    taken, outside = (clipped > unclipped).float(), ((ratio - 1).abs() > 0.2).float()
    wrong = {**fraction_mistakes(taken, (clipped >= unclipped).float(), mask),
             "CleanRL's count divided by every position": (outside * mask).mean(),
             "CleanRL's reading with padding counted as tokens": outside.mean()}
    fraction_check("clip fraction", clipfrac, loss, mask, {
        "answer": way(0.8, 1.2), "nu clipped above only": way(None, 1.2), "nu clipped below only": way(0.8, None),
        "no clipping": (masked(unclipped, mask), {"nothing clipped": torch.tensor(0.0)})}, wrong)


@check("ppo", 2, 2)
def policy_ratio_in_log_space(m, tmp):
    """ppo_policy_loss: the same loss at log-probs 200 lower (exp(log pi) underflows; exp of the difference not)"""
    mask, logprobs, old, advantages = policy_case()
    low, low_clipfrac = m.ppo_policy_loss(logprobs - 200, old - 200, advantages, mask, 0.2)
    assert torch.isfinite(torch.as_tensor(low)).all(), \
        f"loss {float(low)} at log-probs near -200: exp(-200) is 0 in fp32, and 0 / 0 is nan; " \
        "take the ratio as exp(log pi - log pi_old)"
    loss, clipfrac = m.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    # against the student's own loss at the same ratios: a wrong formula is the other checks' to charge
    close(low, loss, tol=1e-4, arm=False, what="loss at log-probs 200 lower, against your loss at the same ratios")
    close(low_clipfrac, clipfrac, tol=1e-4, arm=False, what="clip fraction at log-probs 200 lower")


def value_case():
    """V - V_old above eps and below -eps, each with returns on both sides, and some inside: at eps =
    0.2 the clipped value's error is the larger on 4 tokens above and 3 below, and not on 1 outside
    the range nor the 4 inside (so no two readings of the clip fraction agree). Every padding position
    would take it."""
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).float()
    moved = torch.tensor([[0.5, -0.45, 0.1, 0.35, 0.6, -0.6],  # V - V_old
                          [-0.3, 0.4, -0.05, -0.5, 0.3, -0.15],
                          [0.25, -0.1, 0.5, -0.5, 0.4, -0.3]])
    error = torch.tensor([[0.8, -0.7, 0.3, 1.0, 1.0, -1.0],  # G - V
                          [-0.6, -0.9, 0.2, -0.4, 0.7, 0.9],
                          [1.2, 0.4, 1.0, -1.0, 0.8, -0.6]])
    old_values = torch.randn(3, 6, generator=torch.Generator().manual_seed(6))
    return mask, old_values + moved, old_values, old_values + moved + error


def value_errors(values, old_values, returns, low=-0.2, high=0.2, pick=torch.max):
    """Per token, the larger squared error of V and of V clipped to V_old -+ eps (None: that side open)."""
    clipped = old_values + (values - old_values).clamp(low, high)
    return pick((values - returns) ** 2, (clipped - returns) ** 2)


@check("ppo", 1, 4)
def value_loss_matches_eq_6(m, tmp):
    """ppo_value_loss: 1/2 max((V - G)^2, (clip(V, V_old -+ eps) - G)^2), a mean over response tokens"""
    mask, values, old_values, returns = value_case()
    per_token = value_errors(values, old_values, returns)
    loss, _ = m.ppo_value_loss(values, old_values, returns, mask, 0.2)
    close(loss, 0.5 * masked(per_token, mask), what="loss", wrong={
        "no clipping (or V clipped around G, which never binds)": 0.5 * masked((values - returns) ** 2, mask),
        "V clipped above only": 0.5 * masked(value_errors(values, old_values, returns, low=None), mask),
        "V clipped below only": 0.5 * masked(value_errors(values, old_values, returns, high=None), mask),
        "min where Eq. 6 takes max": 0.5 * masked(value_errors(values, old_values, returns, pick=torch.min),
                                                  mask),
        "the 1/2 missing": masked(per_token, mask),
        "padding counted in the mean": 0.5 * (per_token * mask).mean()})


@check("ppo", 1, 1)
def value_loss_clip_fraction(m, tmp):
    """ppo_value_loss: the fraction of response tokens where the clipped value's error is the larger"""
    mask, values, old_values, returns = value_case()
    loss, clipfrac = m.ppo_value_loss(values, old_values, returns, mask, 0.2)
    unclipped = (values - returns) ** 2

    def way(low, high):
        clipped = (old_values + (values - old_values).clamp(low, high) - returns) ** 2
        moved = values - old_values
        outside = ((moved > 0.2) if high else torch.zeros_like(mask).bool()) | (
            (moved < -0.2) if low else torch.zeros_like(mask).bool())
        readings = {"the clipped error the larger": masked((clipped > unclipped).float(), mask),
                    "V outside V_old -+ eps (CleanRL's reading)": masked(outside.float(), mask)}
        return 0.5 * masked(torch.max(unclipped, clipped), mask), readings

    clipped = value_errors(values, old_values, returns, pick=lambda a, b: b)
    fraction_check("value clip fraction", clipfrac, loss, mask, {
        "answer": way(-0.2, 0.2), "V clipped above only": way(None, 0.2), "V clipped below only": way(-0.2, None),
        "no clipping": (0.5 * masked(unclipped, mask), {"nothing clipped": torch.tensor(0.0)})},
        fraction_mistakes((clipped > unclipped).float(), (clipped >= unclipped).float(), mask))


@check("ppo", 3, 6)
def ppo_raises_the_score(m, tmp):
    """end to end: 20 iterations on the toy raise the rollouts' reward-model score by more than 0.5"""
    m.main(toy_args(m, output_dir=str(tmp / "ppo"), total_episodes=640, batch_size=32, minibatch_size=32,
                    learning_rate=2e-4, max_new_tokens=48, log_every=5, eval_split=None))
    log = read_jsonl(tmp / "ppo" / "metrics.jsonl")
    first, last = log[0]["objective/score"], log[-1]["objective/score"]
    assert last > first + 0.5, f"score {first:.2f} -> {last:.2f}"


# ---- var -----------------------------------------------------------------------------------------


def reward_matrix():
    return torch.tensor([[1.0, 0.2, -0.5, 0.3], [0.1, 2.0, 0.4, -1.0], [0.0, 0.5, 1.5, 0.2],
                         [-0.3, 0.1, 0.2, 0.9]])


def plain_var_weights(rewards, beta, normalizer, ref_logps=None):
    """The three weights of var.py's docstring, in float64."""
    scaled = rewards.double() / beta
    if normalizer == "batch":
        return len(scaled) * torch.softmax(scaled.diagonal(), 0)
    if normalizer == "ref":
        scaled = scaled + ref_logps.double()
    return len(scaled) * torch.softmax(scaled, 1).diagonal()


def symmetric(x: torch.Tensor) -> torch.Tensor:
    """r(x_i, y_j) = r(x_j, y_i): a softmax over the prompts gives the same weights as over the
    responses, so that mistake is var_weights_normalise_over_responses's alone to charge."""
    return (x + x.T) / 2


@check("var", 1, 5)
def var_weights_reward_normaliser(m, tmp):
    """var_weights 'reward': w_i = B e^{r(x_i,y_i)/beta} / sum_j e^{r(x_i,y_j)/beta} (Algorithm 1)"""
    R = symmetric(reward_matrix())
    expected = torch.stack([4 * torch.exp(R[i, i] / 0.5) / torch.exp(R[i] / 0.5).sum() for i in range(4)])
    close(m.var_weights(R, 0.5, "reward"), expected, what="weights",
          wrong={"the factor B missing": expected / 4,
                 "beta missing": 4 * torch.softmax(R, 1).diagonal(),
                 "r * beta where the paper has r / beta": 4 * torch.softmax(R * 0.5, 1).diagonal()})
    close(m.var_weights(torch.ones(4, 1) * torch.randn(1, 4), 0.5, "reward").mean(), torch.tensor(1.0),
          what="mean weight when a response's reward does not depend on the prompt")


@check("var", 1, 3)
def var_weights_other_normalisers(m, tmp):
    """var_weights 'batch' (one softmax over the diagonal) and 'ref' (log pi_ref inside the softmax)"""
    R = reward_matrix()
    L = -torch.rand(4, 4, generator=torch.Generator().manual_seed(2)) * 3
    # each against the student's own 'reward' weights (reward_normaliser's to charge) of a matrix that
    # gives the same softmax: 'batch' is 'reward' with every row the diagonal (or every column: the
    # softmax's axis is normalise_over_responses's); 'ref' at beta = 1 is 'reward' of R + log pi_ref,
    # and with R = 0 at any beta it is 'reward' of log pi_ref at beta = 1 (log pi_ref is not divided)
    rows = R.diagonal().expand(4, 4)
    armed(plain_var_weights(R, 0.5, "batch"), {"the 'reward' weights": plain_var_weights(R, 0.5, "reward")},
          1e-5, "batch weights")
    got, per_row = m.var_weights(R, 0.5, "batch"), m.var_weights(R, 0.5, "reward")
    if gap(got, m.var_weights(rows.T, 0.5, "reward")) > allowed(per_row, 1e-5):
        close(got, m.var_weights(rows, 0.5, "reward"), arm=False,
              what="batch weights, against your 'reward' weights with every row the diagonal",
              wrong={"a softmax per row (your 'reward' weights)": per_row})
    armed(plain_var_weights(R, 1.0, "ref", L), {"pi_ref left out": plain_var_weights(R, 1.0, "reward")}, 1e-5,
          "ref weights")
    close(m.var_weights(R, 1.0, "ref", L), m.var_weights(R + L, 1.0, "reward"), arm=False,
          what="ref weights at beta 1, against your 'reward' weights of r + log pi_ref",
          wrong={"pi_ref left out (your 'reward' weights)": m.var_weights(R, 1.0, "reward")})
    zero = torch.zeros(4, 4)
    armed(plain_var_weights(zero, 0.5, "ref", L), {"divided": plain_var_weights(L, 0.5, "reward")}, 1e-5,
          "ref weights")
    close(m.var_weights(zero, 0.5, "ref", L), m.var_weights(L, 1.0, "reward"), arm=False,
          what="ref weights at r = 0 and beta 0.5, against your 'reward' weights of log pi_ref at beta 1",
          wrong={"log pi_ref divided by beta too": m.var_weights(L, 0.5, "reward")})


@check("var", 2, 2)
def var_weights_normalise_over_responses(m, tmp):
    """var_weights: Z(x_i) sums over the responses j for prompt i (rows), not over the prompts"""
    R = reward_matrix()
    moved = R.clone()
    moved[0, 1:] += torch.tensor([2.0, -1.0, 3.0])  # prompt 0's rewards for the other responses
    # w_1..w_3 must not move: a property of the student's own weights, whatever their formula
    before, after = m.var_weights(R, 0.5, "reward"), m.var_weights(moved, 0.5, "reward")
    over_prompts = {"a softmax over the prompts (dim 0)": 4 * torch.softmax(moved / 0.5, dim=0).diagonal()[1:]}
    armed(plain_var_weights(R, 0.5, "reward")[1:], over_prompts, 1e-5, "weights")
    close(after[1:], before[1:], arm=False, wrong=over_prompts,
          what="the other prompts' weights after changing prompt 0's rewards for their responses")
    assert gap(after[0], before[0]) > 1e-3, "prompt 0's weight did not move with its own rewards"


@check("var", 2, 3)
def var_weights_saturate_exactly(m, tmp):
    """var_weights: r / beta = 1000 for all three normalisers, finite and as at rewards shifted to <= 0"""
    dominant = torch.tensor([[100.0, 0.0, -50.0, 20.0],  # one term per row dominates: w = B or 0
                             [10.0, 0.0, 100.0, -100.0],
                             [0.0, 30.0, 90.0, 0.0],
                             [-100.0, 100.0, 50.0, 0.0]])
    constant = torch.tensor([[100.0], [-100.0], [50.0], [0.0]]).expand(4, 4)  # equal rewards in a row: w = 1
    ref_logps = torch.full((4, 4), -3.0)
    for name, R in (("one term dominates", dominant), ("rows of equal rewards", constant)):
        for normalizer in ("reward", "batch", "ref"):
            got = m.var_weights(R, 0.1, normalizer, ref_logps)
            what = f"'{normalizer}' weights, {name}"
            assert torch.isfinite(got).all(), \
                f"{what}: {got.tolist()} — that is e^(r / beta) overflowing fp32; use a log-space softmax"
            # the weights cannot change when every reward moves by one constant: against the student's
            # own weights of the shifted rewards, so a wrong formula is the unit checks' to charge (1e-3:
            # r / beta near -2000 keeps 4 fp32 digits)
            close(got, m.var_weights(R - R.max(), 0.1, normalizer, ref_logps), tol=1e-3, arm=False,
                  what=f"{what}, against your weights of the same rewards minus their maximum")


@check("var", 2, 1)
def var_weights_in_fp32(m, tmp):
    """var_weights: fp32 weights from bf16 rewards and log-probs, those of the same values in fp32"""
    R = reward_matrix().bfloat16()
    L = (-torch.rand(4, 4, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    for normalizer in ("reward", "batch", "ref"):
        got = m.var_weights(R, 0.5, normalizer, L)
        assert got.dtype in (torch.float32, torch.float64), f"'{normalizer}' weights in {got.dtype}"
        close(got, m.var_weights(R.float(), 0.5, normalizer, L.float()), tol=1e-4, arm=False,
              what=f"'{normalizer}' weights from bf16, against your weights of the same values in fp32")


@check("var", 3, 6)
def var_raises_the_score(m, tmp):
    """end to end: 3 epochs on 96 rows raise the sampled score and gold reward above toy/sft's"""
    results = m.main(toy_args(m, output_dir=str(tmp / "var"), train_split="train[:96]", num_epochs=3,
                              learning_rate=3e-4, num_eval_prompts=128, max_new_tokens=48, log_every=10,
                              sample_every=1000))
    before_rows = read_jsonl(tmp / "var" / "samples" / "step_000000.jsonl")
    before = read_jsonl(tmp / "var" / "metrics.jsonl")[0]
    margin = 2 * math.hypot(results["eval/score_se"], before["eval/score_se"])
    assert results["eval/score"] > before["eval/score"] + margin, (before["eval/score"],
                                                                   results["eval/score"])
    assert gold(read_jsonl(tmp / "var" / "samples.jsonl")) > gold(before_rows) + 0.3


# ---- dera ----------------------------------------------------------------------------------------


def two_logits():
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)


@check("dera", 1, 4)
def realigned_logits_match_eq_9(m, tmp):
    """realigned_logits: (1 - lambda) h_ref + lambda h_aligned, in fp32 (Eq. 9)"""
    h_ref, h_al = (h.bfloat16().float() for h in two_logits())
    got = m.realigned_logits(h_ref.bfloat16(), h_al.bfloat16(), 0.7)
    assert got.dtype in (torch.float32, torch.float64), f"logits in {got.dtype}, not fp32"
    close(got, 0.3 * h_ref + 0.7 * h_al, what="logits at lambda 0.7",
          wrong={"lambda on the reference, 1 - lambda on the aligned model": 0.7 * h_ref + 0.3 * h_al,
                 "the probabilities mixed, not the logits": torch.log(0.3 * h_ref.softmax(-1)
                                                                     + 0.7 * h_al.softmax(-1))})


@check("dera", 1, 3)
def realigned_distribution_is_proposition_1(m, tmp):
    """realigned_logits: softmax is p_ref (p_aligned / p_ref)^lambda, normalised (Proposition 1)"""
    h_ref, h_al = two_logits()
    p_ref, p_al = h_ref.softmax(-1), h_al.softmax(-1)
    # p_ref and p_aligned are the student's own lambda = 0 and 1: which end is which is Eq. 9's check
    own_ref, own_al = m.realigned_logits(h_ref, h_al, 0.0).softmax(-1), m.realigned_logits(h_ref, h_al, 1.0).softmax(-1)
    armed(p_al * (p_al / p_ref), {"lambda clamped to at most 1 (p_aligned)": p_al}, 1e-4, "distribution")
    target = own_ref * (own_al / own_ref) ** 2.0
    close(m.realigned_logits(h_ref, h_al, 2.0).softmax(-1), target / target.sum(-1, keepdim=True), tol=1e-4,
          arm=False, what="distribution at lambda 2", wrong={"lambda clamped to at most 1 (p_aligned)": own_al})


@check("dera", 2, 2)
def realigned_logits_at_negative_lambda(m, tmp):
    """realigned_logits: lambda < 0 too (Eq. 9 holds for any real lambda: -0.5 moves away from h_aligned)"""
    h_ref, h_al = two_logits()
    at_0, at_1 = m.realigned_logits(h_ref, h_al, 0.0), m.realigned_logits(h_ref, h_al, 1.0)
    wrong = {"lambda clamped to >= 0 (your lambda = 0)": at_0, "|lambda| in place of lambda": (at_0 + at_1) / 2}
    armed(1.5 * h_ref - 0.5 * h_al, {"lambda clamped to >= 0": h_ref, "|lambda|": (h_ref + h_al) / 2}, 1e-5,
          "logits at lambda -0.5")
    # Eq. 9 is a line through the student's own lambda = 0 and 1: which end is which is the unit check's
    close(m.realigned_logits(h_ref, h_al, -0.5), 1.5 * at_0 - 0.5 * at_1, arm=False, wrong=wrong,
          what="logits at lambda -0.5, against 1.5 (your lambda = 0) - 0.5 (your lambda = 1)")


@check("dera", 2, 3)
def realigned_logits_with_several_models(m, tmp):
    """realigned_logits: several aligned models, (1 - sum lambda) h_ref + sum lambda_i h_i (App. B)"""
    h_ref, h_a = two_logits()
    h_b = h_a.flip(-1)
    close(m.realigned_logits(h_ref, [h_a, h_b], [0.5, 1.0]), -0.5 * h_ref + 0.5 * h_a + 1.0 * h_b,
          what="logits", wrong={"the reference weighted by 1 - lambda_1 only": 0.5 * h_ref + 0.5 * h_a + h_b,
                                "the first aligned model only": 0.5 * h_ref + 0.5 * h_a})


@check("dera", 3, 5)
def dera_realigns_towards_the_aligned_model(m, tmp):
    """end to end: decoding at lambda 1 scores higher gold than at lambda 0 (toy/sft vs toy/dpo)"""
    m.main(toy_args(m, output_dir=str(tmp / "dera"), lambdas=[0.0, 1.0], num_prompts=64, max_new_tokens=48))
    rows = read_jsonl(tmp / "dera" / "samples.jsonl")
    at = {lam: gold([r for r in rows if r["lambda"] == lam]) for lam in ("0", "1")}
    assert at["1"] > at["0"] + 0.8, at


# ---- expo ----------------------------------------------------------------------------------------


def two_tensors(seed=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)


@check("expo", 1, 5)
def extrapolation_matches_eq_1(m, tmp):
    """extrapolate: theta_1 + alpha (theta_1 - theta_0), in the aligned tensor's dtype (Eq. 1)"""
    theta_0, theta_1 = two_tensors()
    # fresh inputs for each call: an update in place is extrapolation_leaves_both_models's to catch
    close(m.extrapolate(*two_tensors(), 0.5), theta_1 + 0.5 * (theta_1 - theta_0), what="alpha 0.5",
          wrong={"extrapolated from the SFT end, theta_0 + alpha (theta_1 - theta_0)":
                     theta_0 + 0.5 * (theta_1 - theta_0),
                 "the sign flipped, theta_1 - alpha (theta_1 - theta_0)":
                     theta_1 - 0.5 * (theta_1 - theta_0)})
    close(m.extrapolate(*two_tensors(), 0.0), theta_1, what="alpha 0: the aligned model")


@check("expo", 2, 3)
def extrapolation_rounds_once(m, tmp):
    """extrapolate: bf16 tensors computed in fp32 and rounded once; integer buffers copied"""
    g = torch.Generator().manual_seed(7)
    theta_0, theta_1 = (torch.randn(64, generator=g).bfloat16() for _ in range(2))
    got = m.extrapolate(theta_0, theta_1, 0.3)
    assert got.dtype == torch.bfloat16, f"returned in {got.dtype}, not the aligned tensor's bfloat16"
    # against the student's own result on the same values in fp32, rounded once: a wrong Eq. 1 is the
    # unit check's to charge
    once = m.extrapolate(theta_0.float(), theta_1.float(), 0.3).bfloat16()
    assert torch.equal(got, once), "not your fp32 result rounded once (bf16 arithmetic rounds at every step)"
    ids = torch.arange(5)
    assert torch.equal(m.extrapolate(ids, ids + 1, 0.5), ids + 1), "integer buffers: not the aligned model's"


@check("expo", 2, 2)
def extrapolation_at_negative_alpha(m, tmp):
    """extrapolate: alpha < 0 too, back towards theta_0 (-0.5: the midpoint; -1: theta_0 up to rounding)"""
    theta_0, theta_1 = two_tensors()
    at_0, at_1 = m.extrapolate(*two_tensors(), 0.0), m.extrapolate(*two_tensors(), 1.0)
    armed((theta_0 + theta_1) / 2, {"alpha clamped": theta_1, "|alpha|": 1.5 * theta_1 - 0.5 * theta_0}, 1e-5,
          "alpha -0.5")
    # Eq. 1 is a line through the student's own alpha = 0 and 1: where it starts is the unit check's
    for alpha in (-0.5, -1.0):
        close(m.extrapolate(*two_tensors(), alpha), (1 - alpha) * at_0 + alpha * at_1, tol=1e-6, arm=False,
              what=f"alpha {alpha}, against {1 - alpha:g} (your alpha = 0) - {-alpha:g} (your alpha = 1)",
              wrong={"alpha clamped to >= 0 (your alpha = 0)": at_0,
                     "|alpha| in place of alpha": (1 + alpha) * at_0 - alpha * at_1})


@check("expo", 2, 1)
def extrapolation_leaves_both_models(m, tmp):
    """extrapolate: a new tensor; both models' tensors are left as they were (fp32 ones too)"""
    theta_0, theta_1 = two_tensors()
    before = theta_0.clone(), theta_1.clone()
    got = m.extrapolate(theta_0, theta_1, 0.5)
    assert torch.equal(theta_0, before[0]) and torch.equal(theta_1, before[1]), \
        "a model's tensor changed in place (x.float() of an fp32 tensor is x itself, not a copy)"
    assert got.data_ptr() not in (theta_0.data_ptr(), theta_1.data_ptr()), "the result is one of the inputs"


@check("expo", 3, 5)
def expo_extrapolation_raises_the_gold(m, tmp):
    """end to end: alpha 0.5 past toy/dpo scores higher gold than toy/dpo itself"""
    results = m.main(toy_args(m, output_dir=str(tmp / "expo"), alphas=[0.0, 0.5], num_prompts=64))
    rows = read_jsonl(tmp / "expo" / "samples.jsonl")
    at = {a: gold([r for r in rows if r["alpha"] == a]) for a in (0.0, 0.5)}
    assert at[0.5] > at[0.0] + 0.8 and results["best_alpha"] == 0.5, at
