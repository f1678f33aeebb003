"""var.py: the identities of shared/notes/var.md (weights, Theorem B.1, Appendix D, the beta limits),
the grouping, and a smoke run that learns."""

import json
import math

import pytest
import torch

import var
from conftest import TOY


def random_matrices(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return -40 * torch.rand(B, B, generator=g), 3 * torch.randn(B, B, generator=g)


def test_cross_weights_are_in_unit_interval_and_row_normalised():
    ref_logps, rewards = random_matrices()
    w = var.var_weights(ref_logps, rewards, beta=0.5)
    assert ((w >= 0) & (w <= 1)).all()
    assert torch.allclose(w, torch.softmax(ref_logps + rewards / 0.5, dim=1).diagonal())
    # a batch of one prompt with B responses: each w_i is one entry of the same row, which sums to 1
    row_ref, row_reward = ref_logps[:1].expand(8, 8), rewards[:1].expand(8, 8)
    assert var.var_weights(row_ref, row_reward, 0.5).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_cross_weights_survive_long_sequences():
    """Summed log-probs of real responses are hundreds of nats: log-space keeps the weights finite."""
    ref_logps, rewards = random_matrices()
    w = var.var_weights(ref_logps * 30 - 500, rewards, beta=0.5)
    assert torch.isfinite(w).all() and ((w >= 0) & (w <= 1)).all()


def test_beta_limits():
    ref_logps, rewards = random_matrices()
    ref_probs = ref_logps.exp()
    high = var.var_weights(ref_logps, rewards, beta=1e6)  # beta -> inf: the reference alone decides
    assert torch.allclose(high, (ref_probs / ref_probs.sum(1, keepdim=True)).diagonal(), atol=1e-5)
    low = var.var_weights(ref_logps, rewards, beta=1e-6)  # beta -> 0: each row's best response takes all
    best = (rewards.argmax(1) == torch.arange(8)).float()
    assert torch.allclose(low, best, atol=1e-6)


def test_batch_normaliser_reads_the_diagonal_only():
    _, rewards = random_matrices()
    off_diagonal_nan = torch.full((8, 8), float("nan"))
    off_diagonal_nan.diagonal().copy_(rewards.diagonal())
    w = var.var_weights(off_diagonal_nan, off_diagonal_nan, beta=2.0, normalizer="batch")
    assert (torch.allclose(w, 8 * torch.softmax(rewards.diagonal() / 2.0, 0))
            and w.sum().item() == pytest.approx(8))
    assert torch.allclose(var.var_weights(rewards, torch.ones(8, 8), 1.0, "batch"), torch.ones(8))


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


def test_appendix_d_tabular_policy_converges_to_the_rlhf_optimum():
    """Batches holding every response of a prompt: VAR's fixed point is pi_ref exp(r / beta) / Z."""
    g = torch.Generator().manual_seed(3)
    K, beta = 6, 0.7
    for _ in range(3):  # three prompts, each with its own pi_ref and rewards
        pi_ref = torch.softmax(torch.randn(K, generator=g), 0)
        r = torch.randn(K, generator=g)
        ref_logps, rewards = pi_ref.log().expand(K, K), r.expand(K, K)  # [i, j]: the same prompt in every row
        weights = var.var_weights(ref_logps, rewards, beta)
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


def test_group_weights_match_separately_computed_matrices():
    from transformers import AutoModelForSequenceClassification

    tok = var.load_tokenizer(str(TOY / "sft"), False)
    data = var.load_split(str(TOY / "data" / "prefs"), "test[:2]", [("chosen", "rejected")])
    group = var.make_groups(var.build_units(data, tok, "both", 1024, [tok.eos_token_id]), 4, seed=0)[0]
    ref = var.load_model(str(TOY / "sft"), False).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(TOY / "rm").eval()
    no_autocast = torch.autocast("cpu", enabled=False)
    weights, _ = var.group_weights(group, ref, rm, var.Args(beta=0.5), tok.pad_token_id, torch.device("cpu"),
                                   no_autocast)
    ref_logps, rewards = torch.zeros(4, 4), torch.zeros(4, 4)
    with torch.no_grad():
        for i in range(4):
            for j in range(4):
                batch = var.collate_sequences([(group[i][0], group[j][1], True)], tok.pad_token_id)
                ref_logps[i, j] = var.batch_logps(ref, batch, no_autocast)[0]
                rewards[i, j] = rm(input_ids=batch["input_ids"]).logits[0, 0]
    assert torch.allclose(weights, var.var_weights(ref_logps, rewards, 0.5), atol=1e-4)


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
    assert results["eval/kl"] > 0 and 0 < results["weights/mean"] <= 1


def test_sample_every_without_prompts_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="--sample_every needs"):
        var.main(var.Args(eval_prompts="none", sample_every=5, output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
