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


def close(got, expected, tol=1e-5, what="result", wrong=None):
    """got == expected up to tol, relative to expected's size. wrong: {a mistake: the value it gives on
    these inputs}, each armed(); a got that is one of them is named in the message."""
    got, expected, wrong = torch.as_tensor(got), torch.as_tensor(expected), wrong or {}
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


def random_lm_batch(B=3, K=9, V=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, V, generator=g) * 3
    labels = torch.randint(0, V, (B, K), generator=g)
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
                "prompt and padding counted (the mask ignored)": picked.sum(1),
                "the log-softmax over positions, not the vocabulary": (over_positions * labelled).sum(1)}
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
    logits, labels = random_lm_batch()
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
    """sft_loss_sum: a scalar in fp32, also from bf16 logits"""
    logits, labels = random_lm_batch()
    loss = m.sft_loss_sum(logits.bfloat16(), labels)
    assert loss.dtype in (torch.float32, torch.float64), f"the loss in {loss.dtype}, not fp32"
    assert loss.dim() == 0, f"the loss has shape {tuple(loss.shape)}, not a scalar"
    close(loss, -plain_sequence_logps(logits.bfloat16().float(), labels).sum(), tol=1e-4,
          what="loss from bf16 logits (is the log-softmax computed in fp32?)")


@check("sft", 2, 2)
def sft_loss_ignores_prompt_and_padding(m, tmp):
    """sft_loss_sum: prompt and padding positions (label -100) carry no loss"""
    logits, labels = random_lm_batch()
    moved = logits.clone()
    moved[:, :2] += 5.0  # these positions predict tokens labelled -100
    close(m.sft_loss_sum(moved, labels), m.sft_loss_sum(logits, labels), what="loss after moving them")


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


@check("reward_model", 2, 2)
def bt_loss_is_stable_at_large_margins(m, tmp):
    """bradley_terry_loss: finite at margins of +-100 (log(sigmoid(x)) overflows; logsigmoid does not)"""
    losses = m.bradley_terry_loss(torch.tensor([100.0, -100.0]), torch.zeros(2))
    assert torch.isfinite(losses).all(), f"losses {losses.tolist()} at margins 100 and -100: " \
                                         "log(sigmoid(-100)) is log(0) in fp32; F.logsigmoid stays finite"
    close(losses, torch.tensor([0.0, 100.0]), tol=1e-4, what="losses at margins 100 and -100")


@check("reward_model", 1, 3)
def last_token_with_right_padding(m, tmp):
    """last_token_index: the last attended position of right-padded rows"""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    close(m.last_token_index(mask), torch.tensor([2, 4, 0]), tol=0, what="indices",
          wrong={"the first attended position": torch.tensor([0, 0, 0]),
                 "the count of attended positions (one past the last)": mask.sum(1)})


@check("reward_model", 2, 3)
def last_token_with_left_padding(m, tmp):
    """last_token_index: left-padded rows too (mask.sum(1) - 1 is right for right padding only)"""
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    close(m.last_token_index(mask), torch.tensor([4, 3, 4]), tol=0, what="indices",
          wrong={"mask.sum(1) - 1, right for right padding only": mask.sum(1) - 1,
                 "the first attended position": torch.tensor([2, 1, 0])})


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


@check("dpo", 1, 4)
def dpo_loss_matches_eq_3(m, tmp):
    """dpo_loss: -log sigmoid(beta [(pi_c - ref_c) - (pi_r - ref_r)]) and rewards beta (pi - ref)"""
    pc, pr, rc, rr = pair_logps()
    h = (pc - rc) - (pr - rr)
    losses, chosen, rejected = m.dpo_loss(pc, pr, rc, rr, 0.3)
    close(losses, -F.logsigmoid(0.3 * h), what="losses",
          wrong={"beta outside the sigmoid": -0.3 * F.logsigmoid(h),
                 "chosen and rejected swapped": -F.logsigmoid(-0.3 * h),
                 "the reference ignored": -F.logsigmoid(0.3 * (pc - pr))})
    close(chosen, 0.3 * (pc - rc), what="chosen rewards",
          wrong={"beta missing": pc - rc, "the reference ignored": 0.3 * pc})
    close(rejected, 0.3 * (pr - rr), what="rejected rewards",
          wrong={"beta missing": pr - rr, "the reference ignored": 0.3 * pr})


@check("dpo", 1, 2)
def dpo_loss_variants(m, tmp):
    """dpo_loss: conservative DPO's label smoothing and IPO's squared loss (Azar et al. Eq. 17)"""
    pc, pr, rc, rr = pair_logps()
    h = (pc - rc) - (pr - rr)
    close(m.dpo_loss(pc, pr, rc, rr, 0.3, label_smoothing=0.2)[0],
          -0.8 * F.logsigmoid(0.3 * h) - 0.2 * F.logsigmoid(-0.3 * h), what="smoothed losses",
          wrong={"the smoothing ignored": -F.logsigmoid(0.3 * h),
                 "eps and 1 - eps swapped": -0.2 * F.logsigmoid(0.3 * h) - 0.8 * F.logsigmoid(-0.3 * h)})
    close(m.dpo_loss(pc, pr, rc, rr, 0.3, loss_type="ipo")[0], (h - 1 / 0.6) ** 2, what="IPO losses",
          wrong={"1 / beta where IPO has 1 / (2 beta)": (h - 1 / 0.3) ** 2,
                 "beta h inside the square, where IPO has h": (0.3 * h - 1 / 0.6) ** 2})


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
    logits, labels = random_lm_batch()
    expected = plain_sequence_logps(logits, labels)
    close(m.sequence_logps(logits, labels), expected, what="logps", wrong=lm_mistakes(logits, labels))
    close(m.sequence_logps(logits, labels, chunk=3), expected, what="logps with chunk=3",
          wrong={**lm_mistakes(logits, labels), TAIL: without_tail(logits, labels)})
    close(m.sequence_logps(logits, labels, temperature=0.7), plain_sequence_logps(logits, labels, 0.7),
          what="logps at T = 0.7", wrong=lm_mistakes(logits, labels, 0.7))


@check("dpo", 2, 2)
def sequence_logps_sums_and_skips_padding(m, tmp):
    """sequence_logps: a sum over response tokens (not a mean), padding and prompt excluded, fp32"""
    logits, labels = random_lm_batch()
    moved = logits.clone()
    moved[:, :2] -= 7.0  # positions that predict a -100 label
    got = m.sequence_logps(moved.bfloat16(), labels)
    assert got.dtype in (torch.float32, torch.float64), f"logps in {got.dtype}, not fp32"
    close(got, plain_sequence_logps(logits.bfloat16().float(), labels), tol=1e-4,
          what="logps from bf16 logits (in fp32?)", wrong=lm_mistakes(moved.bfloat16().float(), labels))


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
    """eos_trick: an unfinished response scores exactly the penalty; a finished one keeps its score"""
    scores, finished = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([True, False, True])
    close(m.eos_trick(scores, finished, -10.0), torch.tensor([1.0, -10.0, -3.0]), what="scores",
          wrong={"no EOS trick (the scores as they are)": scores,
                 "the penalty added to the score, not in its place": torch.tensor([1.0, -8.0, -3.0]),
                 "the penalty on the finished responses": torch.tensor([-10.0, 2.0, -10.0])})


@check("ppo", 1, 4)
def kl_rewards_match_eq_4(m, tmp):
    """kl_penalized_rewards: -beta (log pi - log pi_ref) per token, plus the score at the last token"""
    mask, logprobs, ref_logprobs, _, scores = episodes()
    kl, last = logprobs - ref_logprobs, mask.sum(1).long() - 1

    def scored(rewards, at):
        rewards = rewards.clone()
        rewards[torch.arange(3), at] += scores
        return rewards

    close(m.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, 0.2), scored(-0.2 * kl * mask, last),
          what="rewards", wrong={"beta missing": scored(-kl * mask, last),
                                 "the sign flipped (the KL rewarded)": scored(0.2 * kl * mask, last),
                                 "the score at the padded row's last position": scored(-0.2 * kl * mask, 5),
                                 "the mask dropped (a KL penalty after the end)": scored(-0.2 * kl, last)})


def plain_gae(rewards, values, mask, gamma, lam):
    """The recursion episode by episode, in plain Python; the episode ends after its n tokens."""
    advantages = torch.zeros_like(rewards)
    for i in range(len(rewards)):
        n, following = int(mask[i].sum()), 0.0
        for t in reversed(range(n)):
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
                 "gamma and lambda swapped": plain_gae(rewards, values, mask, 0.8, 0.9)})
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
        "nu clipped above only (at 1 + eps)": masked(surrogate(ratio, advantages, low=None), mask),
        "nu clipped below only (at 1 - eps)": masked(surrogate(ratio, advantages, high=None), mask),
        "min where the pessimistic bound takes max": masked(surrogate(ratio, advantages, pick=torch.min),
                                                            mask),
        "padding counted in the mean": (per_token * mask).mean(),
        "a sum where the paper takes a mean": (per_token * mask).sum(),
        "a mean of per-sequence means (rows weighted, not tokens)": ((per_token * mask).sum(1)
                                                                       / mask.sum(1)).mean()})


@check("ppo", 1, 1)
def policy_loss_clip_fraction(m, tmp):
    """ppo_policy_loss: the fraction of response tokens where the clipped branch is taken"""
    mask, logprobs, old, advantages = policy_case()
    ratio = torch.exp(logprobs - old)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)
    taken, outside = (clipped > unclipped).float(), ((ratio - 1).abs() > 0.2).float()
    # both readings are in use: the branch taken (the reference), or any ratio outside (CleanRL's)
    readings = {"taken": masked(taken, mask), "outside": masked(outside, mask)}
    wrong = {"0": 0.0, "1": 1.0, "1 - the fraction taken": 1 - readings["taken"],
             "a count over response tokens divided by every position": (taken * mask).mean(),
             "padding counted as tokens (its clipped branches too)": taken.mean(),
             "CleanRL's count divided by every position": (outside * mask).mean(),
             "CleanRL's reading with padding counted as tokens": outside.mean(),
             "ties counted as clipped (>=: every ratio inside the range too)":
                 masked((clipped >= unclipped).float(), mask)}
    armed(readings["taken"], {**wrong, "the 'outside' reading": readings["outside"]}, 1e-6, "clip fraction")
    armed(readings["outside"], wrong, 1e-6, "clip fraction")
    _, clipfrac = m.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    assert any(gap(torch.as_tensor(clipfrac), v) <= 1e-6 for v in readings.values()), (
        f"clip fraction {float(clipfrac):.4g}, expected {float(readings['taken']):.4g} (the clipped branch "
        f"taken) or {float(readings['outside']):.4g} (the ratio outside the range)"
        f"{known(clipfrac, wrong, 1e-6)}")


@check("ppo", 2, 2)
def policy_loss_ignores_padding(m, tmp):
    """ppo_policy_loss: a mean over response tokens only (padding counted in a mean shrinks the loss)"""
    mask, logprobs, old, _, _ = episodes()
    advantages = torch.ones(3, 6)
    loss, _ = m.ppo_policy_loss(logprobs, logprobs, advantages, mask, 0.2)  # ratio 1: loss = -mean(A)
    close(loss, torch.tensor(-1.0), what="loss at ratio 1 and advantage 1",
          wrong={"padding counted in the mean": -mask.mean(),
                 "a sum where the paper takes a mean": -mask.sum()})


def value_case():
    """V - V_old above eps and below -eps, each with returns on both sides, and some inside: at eps =
    0.2 the clipped value's error is the larger on 3 tokens above and 3 below, and not on 3 outside
    the range nor the 3 inside. Every padding position would take it."""
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).float()
    moved = torch.tensor([[0.5, -0.45, 0.1, 0.35, 0.6, -0.6],  # V - V_old
                          [-0.3, 0.4, -0.05, -0.5, 0.3, -0.4],
                          [0.25, -0.1, 0.5, -0.5, 0.4, -0.3]])
    error = torch.tensor([[0.8, -0.7, 0.3, -1.0, 1.0, -1.0],  # G - V
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


@check("var", 1, 5)
def var_weights_reward_normaliser(m, tmp):
    """var_weights 'reward': w_i = B e^{r(x_i,y_i)/beta} / sum_j e^{r(x_i,y_j)/beta} (Algorithm 1)"""
    R = reward_matrix()
    expected = torch.stack([4 * torch.exp(R[i, i] / 0.5) / torch.exp(R[i] / 0.5).sum() for i in range(4)])
    close(m.var_weights(R, 0.5, "reward"), expected, what="weights",
          wrong={"a softmax over the prompts (dim 0), not the responses":
                     4 * torch.softmax(R / 0.5, 0).diagonal(),
                 "the factor B missing": expected / 4,
                 "beta missing": 4 * torch.softmax(R, 1).diagonal(),
                 "r * beta where the paper has r / beta": 4 * torch.softmax(R * 0.5, 1).diagonal()})
    close(m.var_weights(torch.ones(4, 1) * torch.randn(1, 4), 0.5, "reward").mean(), torch.tensor(1.0),
          what="mean weight when a response's reward does not depend on the prompt")


@check("var", 1, 3)
def var_weights_other_normalisers(m, tmp):
    """var_weights 'batch' (one softmax over the diagonal) and 'ref' (pi_ref inside the softmax)"""
    R, L = reward_matrix(), -torch.rand(4, 4, generator=torch.Generator().manual_seed(2)) * 3
    close(m.var_weights(R, 0.5, "batch"), 4 * torch.softmax(R.diagonal() / 0.5, 0), what="batch weights",
          wrong={"a softmax per row (the 'reward' weights)": plain_var_weights(R, 0.5, "reward")})
    S = L + R / 0.5
    close(m.var_weights(R, 0.5, "ref", L), 4 * torch.exp(S.diagonal() - S.logsumexp(1)), what="ref weights",
          wrong={"pi_ref left out (the 'reward' weights)": plain_var_weights(R, 0.5, "reward"),
                 "log pi_ref divided by beta too": plain_var_weights(R + L, 0.5, "reward")})


@check("var", 2, 2)
def var_weights_normalise_over_responses(m, tmp):
    """var_weights: Z(x_i) sums over the responses j for prompt i (rows), not over the prompts"""
    R = reward_matrix()
    rows = torch.softmax(R / 0.5, dim=1).diagonal() * 4
    close(m.var_weights(R, 0.5, "reward"), rows, what="weights",
          wrong={"a softmax over the prompts (dim 0)": torch.softmax(R / 0.5, dim=0).diagonal() * 4})


@check("var", 2, 3)
def var_weights_saturate_exactly(m, tmp):
    """var_weights: exact at r / beta = 1000 for all three normalisers (exp overflows; log space does not)"""
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
            close(got, plain_var_weights(R, 0.1, normalizer, ref_logps), what=what)


@check("var", 2, 1)
def var_weights_in_fp32(m, tmp):
    """var_weights: fp32 weights from bf16 rewards and log-probs (a bf16 softmax is off by ~1e-2)"""
    R = reward_matrix().bfloat16()
    L = (-torch.rand(4, 4, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    for normalizer in ("reward", "batch", "ref"):
        got = m.var_weights(R, 0.5, normalizer, L)
        assert got.dtype in (torch.float32, torch.float64), f"'{normalizer}' weights in {got.dtype}"
        close(got, plain_var_weights(R, 0.5, normalizer, L), tol=1e-4, what=f"'{normalizer}' weights")


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
    target = p_ref * (p_al / p_ref) ** 2.0
    close(m.realigned_logits(h_ref, h_al, 2.0).softmax(-1), target / target.sum(-1, keepdim=True), tol=1e-4,
          what="distribution at lambda 2", wrong={"lambda clamped to at most 1 (p_aligned)": p_al})


@check("dera", 2, 2)
def realigned_logits_at_negative_lambda(m, tmp):
    """realigned_logits: lambda < 0 too (Eq. 9 holds for any real lambda: -0.5 moves away from h_aligned)"""
    h_ref, h_al = two_logits()
    close(m.realigned_logits(h_ref, h_al, -0.5), 1.5 * h_ref - 0.5 * h_al, what="logits at lambda -0.5",
          wrong={"lambda clamped to >= 0 (h_ref alone)": h_ref,
                 "|lambda| in place of lambda": 0.5 * (h_ref + h_al)})


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
    exact = (theta_1.float() + 0.3 * (theta_1.float() - theta_0.float())).bfloat16()
    assert torch.equal(got, exact), "not rounded once from fp32 (bf16 arithmetic rounds at every step)"
    ids = torch.arange(5)
    assert torch.equal(m.extrapolate(ids, ids + 1, 0.5), ids + 1), "integer buffers: not the aligned model's"


@check("expo", 2, 2)
def extrapolation_at_negative_alpha(m, tmp):
    """extrapolate: alpha < 0 too, back towards theta_0 (-0.5: the midpoint; -1: theta_0 up to rounding)"""
    theta_0, theta_1 = two_tensors()
    close(m.extrapolate(*two_tensors(), -0.5), (theta_0 + theta_1) / 2, what="alpha -0.5",
          wrong={"alpha clamped to >= 0 (theta_1)": theta_1,
                 "|alpha| in place of alpha": 1.5 * theta_1 - 0.5 * theta_0})
    close(m.extrapolate(*two_tensors(), -1.0), theta_0, tol=1e-6, what="alpha -1: the SFT model")


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
