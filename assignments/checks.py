"""Every check of every assignment, with its points. A check is a function of the graded module (the
student's whole script, imported) and a scratch folder; it fails by raising. Three levels:

1 unit:       each exercise against its paper's equation on small exact inputs, shapes and dtypes;
2 wiring:     the mistakes people make (a mean where the paper sums, padding counted, a missing
              detach, a softmax over the wrong axis, an overflow), each of which must lose points;
3 end to end: the whole file trains (or decodes) on the toy with short settings and must move the
              model the way the reference script does (thresholds from the reference's own runs,
              with margin).

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


def close(got, expected, tol=1e-5, what="result"):
    got, expected = torch.as_tensor(got), torch.as_tensor(expected)
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    gap = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    assert gap <= tol * (1 + expected.double().abs().max().item()), f"{what}: off by {gap:.3g}"


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


def plain_sequence_logps(logits, labels, temperature=1.0):
    """The formula itself: sum over labelled t of log softmax(logits[t - 1] / T)[labels[t]]."""
    logprobs = torch.log_softmax(logits[:, :-1].double() / temperature, -1)
    target = labels[:, 1:]
    picked = logprobs.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (target != -100)).sum(1)


def random_lm_batch(B=3, K=9, V=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, V, generator=g) * 3
    labels = torch.randint(0, V, (B, K), generator=g)
    labels[:, :3] = -100  # a prompt
    labels[0, -2:] = -100  # padding
    return logits, labels


# ---- sft -----------------------------------------------------------------------------------------


@check("sft", 1, 6)
def sft_loss_matches_the_formula(m, tmp):
    """sft_loss_sum: the summed NLL of the labelled tokens, position t predicting token t + 1"""
    logits, labels = random_lm_batch()
    expected = -plain_sequence_logps(logits, labels).sum()
    close(m.sft_loss_sum(logits, labels), expected, what="loss")
    close(m.sft_loss_sum(logits, labels, chunk=4), expected, what="loss with chunk=4")


@check("sft", 1, 2)
def sft_loss_is_fp32_from_bf16_logits(m, tmp):
    """sft_loss_sum: a scalar in fp32, also from bf16 logits"""
    logits, labels = random_lm_batch()
    loss = m.sft_loss_sum(logits.bfloat16(), labels)
    assert loss.dtype in (torch.float32, torch.float64) and loss.dim() == 0, (loss.dtype, loss.shape)
    close(loss, -plain_sequence_logps(logits.bfloat16().float(), labels).sum(), tol=1e-4)


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
    close(m.bradley_terry_loss(chosen, rejected), -F.logsigmoid(chosen - rejected), what="losses")
    close(m.bradley_terry_loss(torch.zeros(2), torch.zeros(2)), torch.full((2,), math.log(2)))


@check("reward_model", 2, 2)
def bt_loss_is_stable_at_large_margins(m, tmp):
    """bradley_terry_loss: finite at margins of +-100 (log(sigmoid(x)) overflows; logsigmoid does not)"""
    losses = m.bradley_terry_loss(torch.tensor([100.0, -100.0]), torch.zeros(2))
    assert torch.isfinite(losses).all(), losses
    close(losses, torch.tensor([0.0, 100.0]), tol=1e-4)


@check("reward_model", 1, 3)
def last_token_with_right_padding(m, tmp):
    """last_token_index: the last attended position of right-padded rows"""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert m.last_token_index(mask).tolist() == [2, 4, 0]


@check("reward_model", 2, 3)
def last_token_with_left_padding(m, tmp):
    """last_token_index: left-padded rows too (mask.sum(1) - 1 is right for right padding only)"""
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert m.last_token_index(mask).tolist() == [4, 3, 4]


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
    losses, chosen, rejected = m.dpo_loss(pc, pr, rc, rr, 0.3)
    close(losses, -F.logsigmoid(0.3 * ((pc - rc) - (pr - rr))), what="losses")
    close(chosen, 0.3 * (pc - rc), what="chosen rewards")
    close(rejected, 0.3 * (pr - rr), what="rejected rewards")


@check("dpo", 1, 2)
def dpo_loss_variants(m, tmp):
    """dpo_loss: conservative DPO's label smoothing and IPO's squared loss (Azar et al. Eq. 17)"""
    pc, pr, rc, rr = pair_logps()
    h = (pc - rc) - (pr - rr)
    close(m.dpo_loss(pc, pr, rc, rr, 0.3, label_smoothing=0.2)[0],
          -0.8 * F.logsigmoid(0.3 * h) - 0.2 * F.logsigmoid(-0.3 * h), what="smoothed losses")
    close(m.dpo_loss(pc, pr, rc, rr, 0.3, loss_type="ipo")[0], (h - 1 / 0.6) ** 2, what="IPO losses")


@check("dpo", 2, 2)
def dpo_rewards_are_detached(m, tmp):
    """dpo_loss: the implicit rewards are detached (they are logged, not trained)"""
    pc, pr, rc, rr = pair_logps()
    pc.requires_grad_(True)
    losses, chosen, rejected = m.dpo_loss(pc, pr, rc, rr, 0.1)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


@check("dpo", 1, 4)
def sequence_logps_matches_the_formula(m, tmp):
    """sequence_logps: summed log-probs of the labelled tokens, under logits / T, per sequence"""
    logits, labels = random_lm_batch()
    close(m.sequence_logps(logits, labels), plain_sequence_logps(logits, labels), what="logps")
    close(m.sequence_logps(logits, labels, chunk=4), plain_sequence_logps(logits, labels),
          what="logps with chunk=4")
    close(m.sequence_logps(logits, labels, temperature=0.7), plain_sequence_logps(logits, labels, 0.7),
          what="logps at T = 0.7")


@check("dpo", 2, 2)
def sequence_logps_sums_and_skips_padding(m, tmp):
    """sequence_logps: a sum over response tokens (not a mean), padding and prompt excluded, fp32"""
    logits, labels = random_lm_batch()
    moved = logits.clone()
    moved[:, :2] -= 7.0  # positions that predict a -100 label
    got = m.sequence_logps(moved.bfloat16(), labels)
    assert got.dtype in (torch.float32, torch.float64), got.dtype
    close(got, plain_sequence_logps(logits.bfloat16().float(), labels), tol=1e-4)


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


@check("ppo", 1, 3)
def eos_trick_replaces_unfinished_scores(m, tmp):
    """eos_trick: an unfinished response scores exactly the penalty; a finished one keeps its score"""
    scores, finished = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([True, False, True])
    close(m.eos_trick(scores, finished, -10.0), torch.tensor([1.0, -10.0, -3.0]))


@check("ppo", 1, 4)
def kl_rewards_match_eq_4(m, tmp):
    """kl_penalized_rewards: -beta (log pi - log pi_ref) per token, plus the score at the last token"""
    mask, logprobs, ref_logprobs, _, scores = episodes()
    expected = -0.2 * (logprobs - ref_logprobs) * mask
    for i, last in enumerate(mask.sum(1).long() - 1):
        expected[i, last] += scores[i]
    close(m.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, 0.2), expected)


@check("ppo", 1, 5)
def gae_matches_the_recursion(m, tmp):
    """compute_gae: A_t = delta_t + gamma lam A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t; G = A + V"""
    mask, _, _, values, _ = episodes()
    rewards = torch.randn(3, 6, generator=torch.Generator().manual_seed(3)) * mask
    values = values * mask
    advantages, returns = m.compute_gae(rewards, values, mask, 0.9, 0.8)
    expected = torch.zeros_like(rewards)
    for i in range(3):
        n, following = int(mask[i].sum()), 0.0
        for t in reversed(range(n)):
            next_value = values[i, t + 1].item() if t + 1 < n else 0.0  # the episode ends after n tokens
            following = rewards[i, t] + 0.9 * next_value - values[i, t] + 0.9 * 0.8 * following
            expected[i, t] = following
    close(advantages, expected, tol=1e-5, what="advantages")
    close(returns, (expected + values) * mask, tol=1e-5, what="returns")


@check("ppo", 2, 2)
def gae_does_not_bootstrap_past_the_end(m, tmp):
    """compute_gae: the value after a response's last token is 0, whatever the padding holds"""
    mask, _, _, values, _ = episodes()
    rewards = torch.zeros(3, 6)
    padded = values * mask + (1 - mask) * 50.0  # garbage after the end
    advantages, _ = m.compute_gae(rewards, padded, mask, 1.0, 0.95)
    clean, _ = m.compute_gae(rewards, values * mask, mask, 1.0, 0.95)
    close(advantages * mask, clean * mask, what="advantages with garbage after the end")


def clipped_case():
    mask, logprobs, old, _, _ = episodes()
    old = logprobs + 0.3 * old  # ratios on both sides of the clip range
    return mask, logprobs, old, torch.randn(3, 6, generator=torch.Generator().manual_seed(5))


@check("ppo", 1, 4)
def policy_loss_matches_eq_5(m, tmp):
    """ppo_policy_loss: -E_t min(nu A, clip(nu, 1 - eps, 1 + eps) A), nu = pi / pi_old, over tokens"""
    mask, logprobs, old, advantages = clipped_case()
    ratio = torch.exp(logprobs - old)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    loss, _ = m.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    close(loss, (losses * mask).sum() / mask.sum(), what="loss")


@check("ppo", 1, 1)
def policy_loss_clip_fraction(m, tmp):
    """ppo_policy_loss: the fraction of response tokens where the clipped branch is taken"""
    mask, logprobs, old, advantages = clipped_case()
    ratio = torch.exp(logprobs - old)
    taken = (-advantages * ratio.clamp(0.8, 1.2) > -advantages * ratio).float()
    outside = ((ratio - 1).abs() > 0.2).float()  # TRL's reading: any ratio outside the range
    _, clipfrac = m.ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    fractions = [(x * mask).sum() / mask.sum() for x in (taken, outside)]
    assert any(abs(clipfrac - f) < 1e-6 for f in fractions), (float(clipfrac), [float(f) for f in fractions])


@check("ppo", 2, 2)
def policy_loss_ignores_padding(m, tmp):
    """ppo_policy_loss: a mean over response tokens only (padding counted in a mean shrinks the loss)"""
    mask, logprobs, old, _, _ = episodes()
    advantages = torch.ones(3, 6)
    loss, _ = m.ppo_policy_loss(logprobs, logprobs, advantages, mask, 0.2)  # ratio 1: loss = -mean(A)
    close(loss, torch.tensor(-1.0), what="loss at ratio 1 and advantage 1")


@check("ppo", 1, 4)
def value_loss_matches_eq_6(m, tmp):
    """ppo_value_loss: 1/2 max((V - G)^2, (clip(V, V_old -+ eps) - G)^2), a mean over response tokens"""
    mask, values, old_values, returns, _ = episodes()
    clipped_values = old_values + (values - old_values).clamp(-0.2, 0.2)
    per_token = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    loss, _ = m.ppo_value_loss(values, old_values, returns, mask, 0.2)
    close(loss, (per_token * mask).sum() / mask.sum(), what="loss")


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


@check("var", 1, 5)
def var_weights_reward_normaliser(m, tmp):
    """var_weights 'reward': w_i = B e^{r(x_i,y_i)/beta} / sum_j e^{r(x_i,y_j)/beta} (Algorithm 1)"""
    R = reward_matrix()
    expected = torch.stack([4 * torch.exp(R[i, i] / 0.5) / torch.exp(R[i] / 0.5).sum() for i in range(4)])
    close(m.var_weights(R, 0.5, "reward"), expected, what="weights")
    close(m.var_weights(torch.ones(4, 1) * torch.randn(1, 4), 0.5, "reward").mean(), torch.tensor(1.0),
          what="mean weight when a response's reward does not depend on the prompt")


@check("var", 1, 3)
def var_weights_other_normalisers(m, tmp):
    """var_weights 'batch' (one softmax over the diagonal) and 'ref' (pi_ref inside the softmax)"""
    R, L = reward_matrix(), -torch.rand(4, 4, generator=torch.Generator().manual_seed(2)) * 3
    close(m.var_weights(R, 0.5, "batch"), 4 * torch.softmax(R.diagonal() / 0.5, 0), what="batch weights")
    S = L + R / 0.5
    close(m.var_weights(R, 0.5, "ref", L), 4 * torch.exp(S.diagonal() - S.logsumexp(1)), what="ref weights")


@check("var", 2, 2)
def var_weights_normalise_over_responses(m, tmp):
    """var_weights: Z(x_i) sums over the responses j for prompt i (rows), not over the prompts"""
    R = reward_matrix()
    rows = torch.softmax(R / 0.5, dim=1).diagonal() * 4
    close(m.var_weights(R, 0.5, "reward"), rows, what="weights (a softmax over dim 0 would differ)")


@check("var", 2, 2)
def var_weights_do_not_overflow(m, tmp):
    """var_weights: finite at r / beta = 1000 (exp overflows; a log-space softmax does not)"""
    R = reward_matrix() * 100
    for normalizer in ("reward", "batch", "ref"):
        weights = m.var_weights(R, 0.1, normalizer, torch.full((4, 4), -3.0))
        assert torch.isfinite(weights).all(), (normalizer, weights)


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
    h_ref, h_al = two_logits()
    got = m.realigned_logits(h_ref.bfloat16(), h_al.bfloat16(), 0.7)
    assert got.dtype in (torch.float32, torch.float64), got.dtype
    close(got, 0.3 * h_ref.bfloat16().float() + 0.7 * h_al.bfloat16().float(), tol=1e-5)


@check("dera", 1, 3)
def realigned_distribution_is_proposition_1(m, tmp):
    """realigned_logits: softmax is p_ref (p_aligned / p_ref)^lambda, normalised (Proposition 1)"""
    h_ref, h_al = two_logits()
    p_ref, p_al = h_ref.softmax(-1), h_al.softmax(-1)
    target = p_ref * (p_al / p_ref) ** 2.0
    close(m.realigned_logits(h_ref, h_al, 2.0).softmax(-1), target / target.sum(-1, keepdim=True), tol=1e-4)


@check("dera", 2, 3)
def realigned_logits_with_several_models(m, tmp):
    """realigned_logits: several aligned models, (1 - sum lambda) h_ref + sum lambda_i h_i (App. B)"""
    h_ref, h_a = two_logits()
    h_b = h_a.flip(-1)
    close(m.realigned_logits(h_ref, [h_a, h_b], [0.5, 1.0]), -0.5 * h_ref + 0.5 * h_a + 1.0 * h_b)


@check("dera", 3, 5)
def dera_realigns_towards_the_aligned_model(m, tmp):
    """end to end: decoding at lambda 1 scores higher gold than at lambda 0 (toy/sft vs toy/dpo)"""
    m.main(toy_args(m, output_dir=str(tmp / "dera"), lambdas=[0.0, 1.0], num_prompts=64, max_new_tokens=48))
    rows = read_jsonl(tmp / "dera" / "samples.jsonl")
    at = {lam: gold([r for r in rows if r["lambda"] == lam]) for lam in ("0", "1")}
    assert at["1"] > at["0"] + 0.8, at


# ---- expo ----------------------------------------------------------------------------------------


@check("expo", 1, 5)
def extrapolation_matches_eq_1(m, tmp):
    """extrapolate: theta_1 + alpha (theta_1 - theta_0), in the aligned tensor's dtype (Eq. 1)"""
    g = torch.Generator().manual_seed(6)
    theta_0, theta_1 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    close(m.extrapolate(theta_0, theta_1, 0.5), theta_1 + 0.5 * (theta_1 - theta_0))
    close(m.extrapolate(theta_0, theta_1, 0.0), theta_1, what="alpha 0: the aligned model")


@check("expo", 2, 3)
def extrapolation_rounds_once(m, tmp):
    """extrapolate: bf16 tensors computed in fp32 and rounded once; integer buffers copied"""
    g = torch.Generator().manual_seed(7)
    theta_0, theta_1 = (torch.randn(64, generator=g).bfloat16() for _ in range(2))
    got = m.extrapolate(theta_0, theta_1, 0.3)
    assert got.dtype == torch.bfloat16, got.dtype
    exact = (theta_1.float() + 0.3 * (theta_1.float() - theta_0.float())).bfloat16()
    assert torch.equal(got, exact), "not rounded once from fp32"
    ids = torch.arange(5)
    assert torch.equal(m.extrapolate(ids, ids + 1, 0.5), ids + 1)


@check("expo", 3, 5)
def expo_extrapolation_raises_the_gold(m, tmp):
    """end to end: alpha 0.5 past toy/dpo scores higher gold than toy/dpo itself"""
    results = m.main(toy_args(m, output_dir=str(tmp / "expo"), alphas=[0.0, 0.5], num_prompts=64))
    rows = read_jsonl(tmp / "expo" / "samples.jsonl")
    at = {a: gold([r for r in rows if r["alpha"] == a]) for a in (0.0, 0.5)}
    assert at[0.5] > at[0.0] + 0.8 and results["best_alpha"] == 0.5, at
