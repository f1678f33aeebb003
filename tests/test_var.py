"""var.py: the identities of docs/var.md (the three normalisers, Theorem B.1, Appendix D on
sampled batches, the beta limits), the grouping, micro-batched scoring, and a smoke run that learns."""

import json
import math

import pytest
import torch

import var
from conftest import TOY


def random_matrices(B=8, seed=0):
    """ref_logps[i, j] = log pi_ref(y_j | x_i) and rewards[i, j] = r(x_i, y_j), every entry different."""
    g = torch.Generator().manual_seed(seed)
    return -40 * torch.rand(B, B, generator=g), 3 * torch.randn(B, B, generator=g)


def test_reward_weights_are_algorithm_1():
    """Default: w_i = B softmax_j(r(x_i, y_j) / beta)[i], the normaliser from exponentiated rewards."""
    _, rewards = random_matrices()
    w = var.var_weights(rewards, beta=0.5)
    expected = torch.stack([8 * torch.exp(rewards[i, i] / 0.5) / torch.exp(rewards[i] / 0.5).sum()
                            for i in range(8)])
    assert torch.allclose(w, expected, rtol=1e-5)
    assert ((w >= 0) & (w <= 8)).all()
    assert not torch.allclose(w, var.var_weights(rewards, 0.5, "batch"), atol=1e-2)
    # rewards that do not depend on the prompt: every row is the same, the weights have mean 1
    same = rewards[:1].expand(8, 8)
    assert var.var_weights(same, 0.5).mean().item() == pytest.approx(1.0, abs=1e-5)


def test_ref_weights_are_b_times_the_old_cross_estimator_and_survive_long_sequences():
    ref_logps, rewards = random_matrices()
    w = var.var_weights(rewards, 0.5, "ref", ref_logps)
    assert torch.allclose(w, 8 * torch.softmax(ref_logps + rewards / 0.5, dim=1).diagonal(), rtol=1e-5)
    one_prompt = var.var_weights(rewards[:1].expand(8, 8), 0.5, "ref", ref_logps[:1].expand(8, 8))
    assert one_prompt.sum().item() == pytest.approx(8.0, abs=1e-4)  # one row of one softmax, times B
    long = var.var_weights(rewards, 0.5, "ref", ref_logps * 30 - 500)  # summed log-probs of long responses
    assert torch.isfinite(long).all() and ((long >= 0) & (long <= 8)).all()


@pytest.mark.parametrize("normalizer", ["reward", "ref", "batch"])
def test_beta_limits_and_equal_rewards(normalizer):
    ref_logps, rewards = random_matrices()
    ref = ref_logps if normalizer == "ref" else None
    equal = var.var_weights(torch.full((8, 8), 2.0), 0.3, normalizer, torch.zeros(8, 8))
    assert torch.allclose(equal, torch.ones(8))
    low = var.var_weights(rewards, 1e-6, normalizer, ref)  # beta -> 0: all weight on the best responses
    if normalizer == "batch":
        best = (rewards.diagonal() == rewards.diagonal().max()).float() * 8
    else:
        best = (rewards.argmax(1) == torch.arange(8)).float() * 8
    assert torch.allclose(low, best, atol=1e-5)
    if normalizer != "ref":  # beta -> inf: plain SFT on the data
        assert torch.allclose(var.var_weights(rewards, 1e7, normalizer), torch.ones(8), atol=1e-5)


def test_batch_normaliser_reads_the_diagonal_only():
    _, rewards = random_matrices()
    off_diagonal_nan = torch.full((8, 8), float("nan"))
    off_diagonal_nan.diagonal().copy_(rewards.diagonal())
    w = var.var_weights(off_diagonal_nan, beta=2.0, normalizer="batch")
    assert (torch.allclose(w, 8 * torch.softmax(rewards.diagonal() / 2.0, 0))
            and w.sum().item() == pytest.approx(8))


def test_var_loss_and_effective_sample_size():
    logps = torch.tensor([-3.0, -10.0, -1.0], requires_grad=True)
    w = torch.tensor([0.5, 0.1, 1.0])
    loss = var.var_loss(logps, w)
    assert loss.item() == pytest.approx(-(0.5 * -3 + 0.1 * -10 + 1.0 * -1) / 3)
    loss.backward()
    assert torch.allclose(logps.grad, -w / 3)  # every weight positive: every log-prob pushed up
    assert var.effective_sample_size(torch.ones(8)).item() == pytest.approx(8)
    assert var.effective_sample_size(torch.tensor([1.0, 0, 0, 0])).item() == pytest.approx(1)


def train_tabular(weights: torch.Tensor, steps=3000) -> torch.Tensor:
    """A tabular policy (one logit per response) trained with var_loss on the full response set."""
    logits = torch.zeros_like(weights, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        var.var_loss(torch.log_softmax(logits, 0), weights).backward()
        opt.step()
    return torch.softmax(logits, 0).detach()


def test_theorem_b1_weighted_sft_optimum_is_normalised_weights():
    w = torch.tensor([0.2, 1.5, 0.05, 0.75])
    optimum = w / w.sum()
    value = lambda pi: -(w * pi.log()).sum()
    assert torch.allclose(train_tabular(w), optimum, atol=1e-3)
    assert value(optimum).item() == pytest.approx(-(w * (w / w.sum()).log()).sum().item())
    torch.manual_seed(0)
    for _ in range(100):  # any other point of the simplex is worse
        other = torch.distributions.Dirichlet(torch.ones(4)).sample()
        assert value(other) >= value(optimum) - 1e-6


def test_appendix_d_batches_sampled_from_pi_ref_converge_to_pi_star():
    """Appendix D on the data VAR actually sees: batches SAMPLED from pi_ref (one prompt). The minimiser
    of the expected weighted loss is the accumulated weight per response (Theorem B.1). Under the
    reward-only normaliser it tends to pi* = pi_ref e^{r/beta} / Z as B grows (a self-normalised
    estimate: its bias is O(1/B)); the "ref" reading, which counts pi_ref twice, stays far at any B."""
    K, beta, n_batches = 5, 0.7, 20000
    pi_ref = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08])
    r = torch.tensor([-0.2, 0.3, 0.5, -0.4, 0.6])
    pi_star = pi_ref * torch.exp(r / beta)
    pi_star /= pi_star.sum()
    assert 0.5 * (pi_star - pi_ref).abs().sum() >= 0.2  # a target far enough from pi_ref to tell apart
    tv = {}
    for B in (8, 32):
        g = torch.Generator().manual_seed(B)
        y = torch.multinomial(pi_ref, n_batches * B, replacement=True, generator=g).view(n_batches, B)
        rewards = r[y][:, None, :].expand(n_batches, B, B)  # [n, i, j] = r(x, y_j): one prompt in every row
        ref_logps = pi_ref.log()[y][:, None, :].expand(n_batches, B, B)
        for normalizer in ("reward", "ref"):
            w = torch.vmap(lambda R, L: var.var_weights(R, beta, normalizer, L))(rewards, ref_logps)
            minimiser = torch.zeros(K).index_add_(0, y.flatten(), w.flatten())
            tv[normalizer, B] = 0.5 * (minimiser / minimiser.sum() - pi_star).abs().sum().item()
    assert tv["reward", 32] < 0.02 and tv["reward", 32] < tv["reward", 8] < 0.04, tv
    assert tv["ref", 8] > tv["reward", 8] + 0.05 and tv["ref", 32] > tv["reward", 32] + 0.05, tv


def test_ref_reading_is_exact_when_a_batch_holds_every_response_once():
    """The case the "ref" reading was built for: a batch holding every response of a prompt once."""
    g = torch.Generator().manual_seed(3)
    K, beta = 6, 0.7
    pi_ref = torch.softmax(torch.randn(K, generator=g), 0)
    r = torch.randn(K, generator=g)
    weights = var.var_weights(r.expand(K, K), beta, "ref", pi_ref.log().expand(K, K))
    target = pi_ref * torch.exp(r / beta)
    assert torch.allclose(train_tabular(weights), target / target.sum(), atol=2e-3)


def test_groups_keep_a_pairs_responses_together():
    tok = var.load_tokenizer(str(TOY / "sft"), False)
    data = var.load_split(str(TOY / "data" / "prefs"), "test[:20]", [("chosen", "rejected")])
    units = var.build_units(data, tok, "both", 1024, [tok.eos_token_id])
    groups = var.make_groups(units, 8, seed=0)
    assert len(groups) == 5 and all(len(g) == 8 for g in groups)
    for group in groups:
        for k in range(0, 8, 2):  # chosen then rejected of one row, same prompt
            assert group[k][0] == group[k + 1][0] and group[k][1] != group[k + 1][1]
    assert len(var.build_units(data, tok, "chosen", 1024, [tok.eos_token_id])[0]) == 1
    with pytest.raises(SystemExit, match="would split"):  # an odd batch cannot hold whole pairs
        var.make_groups(units, 7, seed=0)


@pytest.mark.parametrize("normalizer", ["reward", "ref"])
def test_group_weights_match_separately_computed_matrices_in_any_micro_batch(normalizer):
    tok = var.load_tokenizer(str(TOY / "sft"), False)
    data = var.load_split(str(TOY / "data" / "prefs"), "test[:2]", [("chosen", "rejected")])
    group = var.make_groups(var.build_units(data, tok, "both", 1024, [tok.eos_token_id]), 4, seed=0)[0]
    ref = var.load_model(str(TOY / "sft"), False).eval()
    rm = var.load_model(str(TOY / "rm"), False, scalar=True).eval()
    no_autocast = torch.autocast("cpu", enabled=False)
    ref_logps, rewards = torch.zeros(4, 4), torch.zeros(4, 4)
    with torch.no_grad():
        for i in range(4):
            for j in range(4):
                batch = var.collate_sequences([(group[i][0], group[j][1], True)], tok.pad_token_id)
                ref_logps[i, j] = var.batch_logps(ref, batch, no_autocast)[0]
                rewards[i, j] = rm(input_ids=batch["input_ids"]).logits[0, 0]
    expected = var.var_weights(rewards, 0.5, normalizer, ref_logps)
    for score_batch_size in (3, 16):  # micro-batches that split the 16 sequences unevenly, and one pass
        args = var.Args(beta=0.5, normalizer=normalizer, score_batch_size=score_batch_size)
        weights, diagonal = var.group_weights(group, ref, rm, args, tok.pad_token_id, torch.device("cpu"),
                                              no_autocast)
        assert torch.allclose(weights, expected, atol=1e-5) and torch.allclose(diagonal, rewards.diagonal(),
                                                                                atol=1e-5)


def test_smoke_run_learns(tmp_path):
    """Seconds of VAR from toy/sft: the reward-model score of sampled responses rises above the
    starting model's, sampled the same way (--sample_every samples before the first step)."""
    args = var.Args(train_split="train[:96]", num_epochs=3, learning_rate=3e-4, num_eval_prompts=128,
                    max_new_tokens=48, log_every=10, sample_every=1000, output_dir=str(tmp_path / "var"))
    results = var.main(args)
    before = json.loads(open(tmp_path / "var" / "metrics.jsonl").readline())
    assert before["step"] == 0 and before["eval/kl"] == 0  # the policy is still the reference
    assert results["eval/score"] > before["eval/score"] + 2 * math.hypot(results["eval/score_se"],
                                                                         before["eval/score_se"])
    assert results["eval/kl"] > 0 and 0 < results["weights/mean"] <= args.batch_size


def test_sample_every_without_prompts_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="--sample_every needs"):
        var.main(var.Args(eval_prompts="none", sample_every=5, output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
