"""ppo.py: GAE against a brute-force loop, the KL-penalised rewards, the clipped losses, the rollout
layout against the models' own outputs, and a smoke run that learns."""

import json

import pytest
import torch

import ppo
from conftest import TOY


def ragged_batch(seed=0, B=5, R=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 6, 3])[:B]
    mask = (torch.arange(R)[None] < lengths[:, None]).float()
    return torch.randn(B, R, generator=g) * mask, torch.randn(B, R, generator=g) * mask, mask


def brute_force_gae(rewards, values, mask, gamma, lam):
    """A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, per
    sequence and time step, with V = 0 after the last token."""
    B, R = rewards.shape
    advantages = torch.zeros(B, R)
    for b in range(B):
        n = int(mask[b].sum())
        v = [values[b, t].item() for t in range(n)] + [0.0]
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            advantages[b, t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t))
    return advantages


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_equals_brute_force(gamma, lam):
    rewards, values, mask = ragged_batch()
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, brute_force_gae(rewards, values, mask, gamma, lam), atol=1e-5)
    assert torch.allclose(returns, (advantages + values) * mask)
    assert (advantages[mask == 0] == 0).all()


def test_gae_with_gamma_lambda_one_is_return_minus_value():
    rewards, values, mask = ragged_batch(seed=1)
    advantages, returns = ppo.compute_gae(rewards, values, mask, 1.0, 1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1) * mask  # Monte Carlo return G_t
    assert torch.allclose(returns, reward_to_go, atol=1e-5)
    assert torch.allclose(advantages, (reward_to_go - values) * mask, atol=1e-5)


def test_kl_penalized_rewards_sum_to_score_minus_kl():
    _, _, mask = ragged_batch()
    g = torch.Generator().manual_seed(2)
    logprobs, ref_logprobs = -torch.rand(5, 7, generator=g) * 3, -torch.rand(5, 7, generator=g) * 3
    scores = torch.randn(5, generator=g)
    rewards = ppo.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta=0.05)
    expected = scores - 0.05 * ((logprobs - ref_logprobs) * mask).sum(1)
    assert torch.allclose(rewards.sum(1), expected, atol=1e-6)
    last = mask.sum(1).long() - 1
    assert torch.allclose(rewards[torch.arange(5), last] - scores,
                          (-0.05 * (logprobs - ref_logprobs))[torch.arange(5), last], atol=1e-6)
    assert (rewards[mask == 0] == 0).all()


def test_masked_whiten():
    x, _, mask = ragged_batch(seed=3)
    w = ppo.masked_whiten(x * 4 + 2, mask)
    assert ppo.masked_mean(w, mask).abs() < 1e-5
    assert ppo.masked_mean(w ** 2, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[mask == 0] == 0).all()


def test_clipped_losses_equal_unclipped_inside_the_range():
    advantages, old_values, mask = ragged_batch(seed=4)
    old_logprobs = -torch.rand(5, 7)
    logprobs = old_logprobs + (torch.rand(5, 7) - 0.5) * 0.3  # ratios within exp(+-0.15) of 1
    assert ((logprobs - old_logprobs).exp() - 1).abs().max() < 0.2
    loss, clipfrac = ppo.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    assert (torch.allclose(loss, ppo.masked_mean(-advantages * (logprobs - old_logprobs).exp(), mask))
            and clipfrac == 0)
    returns = old_values + torch.randn(5, 7)
    values = old_values + (torch.rand(5, 7) - 0.5) * 0.3
    vloss, vclip = ppo.ppo_value_loss(values, old_values, returns, mask, 0.2)
    assert torch.allclose(vloss, 0.5 * ppo.masked_mean((values - returns) ** 2, mask)) and vclip == 0


def test_clipped_losses_have_no_gradient_where_clipping_binds():
    mask = torch.ones(1, 4)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    old_logprobs = torch.zeros(1, 4)
    # ratios 1.5 (A > 0: clipped), 0.9 (A > 0: free), 0.5 (A < 0: clipped), 1.1 (A < 0: free)
    logprobs = torch.log(torch.tensor([[1.5, 0.9, 0.5, 1.1]])).requires_grad_()
    loss, clipfrac = ppo.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    loss.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 2] == 0
    assert logprobs.grad[0, 1] != 0 and logprobs.grad[0, 3] != 0 and clipfrac == 0.5
    old_values, returns = torch.zeros(1, 2), torch.tensor([[2.0, 2.0]])
    values = torch.tensor([[0.5, 0.1]], requires_grad=True)  # 0.5 is beyond the clip range and worse clipped
    vloss, _ = ppo.ppo_value_loss(values, old_values, returns, torch.ones(1, 2), 0.2)
    vloss.backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 1] != 0


@pytest.fixture(scope="module")
def toy_models():
    tok = ppo.load_tokenizer(str(TOY / "sft"), False)
    policy = ppo.load_model(str(TOY / "sft"), False).eval()
    rm = ppo.load_model(str(TOY / "rm"), False, scalar=True).eval()
    return tok, policy, rm


def test_rollout_layout_matches_the_models_own_outputs(toy_models):
    """Left-padded queries and right-padded responses give each sequence's own log-probs, and the
    reward at the last real token equals AutoModelForSequenceClassification's score."""
    tok, policy, rm = toy_models
    prompts = ppo.load_split(str(TOY / "data" / "prompts"), "validation", [("prompt",)])["prompt"][:6]
    torch.manual_seed(0)
    args = ppo.Args(max_new_tokens=12)  # short: some responses end without EOS
    batch = ppo.rollout(policy, tok, prompts, args, torch.device("cpu"), [tok.eos_token_id])
    assert not batch["finished"].all() and batch["finished"].any()
    no_autocast = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        logprobs, _ = ppo.policy_logprobs(policy, batch, 0.7, no_autocast)
        _, scores = ppo.values_and_scores(rm, batch, no_autocast)
    for i in range(6):
        query = batch["query"][i][batch["query_mask"][i].bool()]
        response = batch["response"][i][batch["mask"][i].bool()]
        if batch["finished"][i]:
            assert response[-1] == tok.eos_token_id and (response == tok.eos_token_id).sum() == 1
        ids = torch.cat([query, response])[None]
        with torch.no_grad():
            alone = torch.log_softmax(policy(ids).logits[0, len(query) - 1 : -1] / 0.7, -1)
            own_score = rm(ids).logits[0, 0]
        expected = alone.gather(-1, response[:, None]).squeeze(-1)
        assert torch.allclose(logprobs[i][: len(response)], expected, atol=1e-4)
        assert torch.allclose(scores[i], own_score, atol=1e-4)


@pytest.mark.parametrize("batch, rollouts, b, g, iterations, steps",
                         [(512, 2, 64, 2, 2, 16), (8, 1, 4, 2, 2, 2)])
def test_minibatch_size_and_accumulation_are_table_9s_b_and_g(batch, rollouts, b, g, iterations, steps):
    """--minibatch_size is Table 9's b (episodes per forward-backward pass) and
    --gradient_accumulation_steps its g (minibatches per optimiser step), so a step takes b x g
    episodes: Table 11's row B = 512, r = 2, b = 64, g = 2 makes 8 steps of 128 episodes per batch;
    8 episodes at b = 4, g = 2 make one step of 8, not two of 4."""
    counts = ppo.main(ppo.Args(dry_run=True, batch_size=batch, num_rollouts_per_prompt=rollouts,
                               minibatch_size=b, gradient_accumulation_steps=g,
                               total_episodes=iterations * batch * rollouts))
    assert counts["train/iterations"] == iterations and counts["train/steps"] == steps


def test_smoke_run_learns(tmp_path):
    """A few iterations on the toy: the reward-model score of the rollouts rises."""
    out = tmp_path / "ppo"
    ppo.main(ppo.Args(total_episodes=320, batch_size=32, minibatch_size=32, learning_rate=4e-4,
                      max_new_tokens=48, log_every=4, eval_split=None, output_dir=str(out)))
    log = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first, last = log[0]["objective/score"], log[-1]["objective/score"]
    assert last > first + 0.5, (first, last)
    assert all(r["val/eos_rate"] > 0.9 for r in log) and log[-1]["objective/kl"] > 0


def test_a_stopped_run_resumes_with_the_same_rollouts_and_losses(tmp_path, monkeypatch):
    """Ctrl-C in iteration 3, --resume from the checkpoint of iteration 2: every logged number (the
    rollouts' scores and lengths, the losses) and the end-of-run samples equal an uninterrupted run's, so
    the policy, value model, optimiser, prompt stream and random states all came back."""
    def run(out, **changes):
        ppo.main(ppo.Args(total_episodes=16, batch_size=4, minibatch_size=2, gradient_accumulation_steps=2,
                          ppo_epochs=2, max_new_tokens=8, num_eval_prompts=4, log_every=1, save_every=1,
                          output_dir=str(out), **changes))

    run(tmp_path / "whole")
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def interrupt_in_iteration_3(*args, **kwargs):  # two optimiser steps (epochs) per iteration
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", interrupt_in_iteration_3)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "stopped")
    run(tmp_path / "stopped", resume=True)
    whole, resumed = ([json.loads(line) for line in open(tmp_path / run_dir / "metrics.jsonl")]
                      for run_dir in ("whole", "stopped"))
    assert [r["iteration"] for r in resumed] == [r["iteration"] for r in whole] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        assert all(abs(a[k] - b[k]) < 1e-5 for k in a if not k.startswith("perf/")), (a, b)
    samples = [open(tmp_path / run_dir / "samples.jsonl").read() for run_dir in ("whole", "stopped")]
    assert samples[0] == samples[1]
