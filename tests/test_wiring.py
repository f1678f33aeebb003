"""The algorithms wired right inside main, not just their helpers: tests on the quantities a broken
wiring changes (issue 19). PPO runs two tiny iterations with its helpers wrapped to record what main
feeds them; the reward model's new head is checked at its initialisation; DPO's and SFT's loops are
checked on what they feed the loss and what they log."""

import json
import math

import pytest
import torch

import dpo
import ppo
import reward_model
import sft
from conftest import TOY


@pytest.fixture(scope="module")
def ppo_record(tmp_path_factory):
    """Two iterations of 8 episodes, minibatches of 4, responses cut at 8 tokens (most never reach
    their stop token), a learning rate large enough that the policy leaves pi_ref in one iteration."""
    record = {"iteration": 0, "kl": [], "gae": [], "loss": []}
    real = {name: getattr(ppo, name) for name in ("rollout", "take", "kl_penalized_rewards", "compute_gae",
                                                  "ppo_policy_loss")}

    def rollout(*args, **kwargs):
        record["iteration"] += 1
        return real["rollout"](*args, **kwargs)

    def take(batch, index):
        part = real["take"](batch, index)
        record["last_take"] = part
        return part

    def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
        record["kl"].append(dict(finished=record["last_take"]["finished"].clone(), scores=scores.clone(),
                                 logprobs=logprobs.clone(), ref=ref_logprobs.clone(), mask=mask.clone()))
        return real["kl_penalized_rewards"](scores, logprobs, ref_logprobs, mask, beta)

    def compute_gae(rewards, *args, **kwargs):
        record["gae"].append(rewards.clone())
        return real["compute_gae"](rewards, *args, **kwargs)

    def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
        record["loss"].append(dict(iteration=record["iteration"], ratio=(logprobs - old_logprobs).exp().detach(),
                                   advantages=advantages.clone(), mask=mask.clone()))
        return real["ppo_policy_loss"](logprobs, old_logprobs, advantages, mask, clip)

    patch = pytest.MonkeyPatch()
    for name, fn in [("rollout", rollout), ("take", take), ("kl_penalized_rewards", kl_penalized_rewards),
                     ("compute_gae", compute_gae), ("ppo_policy_loss", ppo_policy_loss)]:
        patch.setattr(ppo, name, fn)
    args = ppo.Args(total_episodes=16, batch_size=8, minibatch_size=4, max_new_tokens=8, eval_split=None,
                    learning_rate=1e-3, warmup_ratio=0.0, beta=0.5, log_every=1,
                    output_dir=str(tmp_path_factory.mktemp("ppo") / "run"))
    try:
        ppo.main(args)
    finally:
        patch.undo()
    record["args"] = args
    return record


def test_a_response_without_a_stop_token_scores_exactly_the_penalty(ppo_record):
    penalty = ppo_record["args"].missing_eos_penalty
    unfinished = 0
    for call in ppo_record["kl"]:
        cut = ~call["finished"]
        unfinished += cut.sum().item()
        assert (call["scores"][cut] == penalty).all()
        assert (call["scores"][~cut] != penalty).all()
    assert unfinished > 0  # the trick was exercised


def test_token_rewards_fed_to_gae_carry_minus_beta_kl(ppo_record):
    beta = ppo_record["args"].beta
    assert len(ppo_record["kl"]) == len(ppo_record["gae"]) == 4  # 2 iterations x 2 minibatches
    moved = 0.0
    for call, rewards in zip(ppo_record["kl"], ppo_record["gae"]):
        expected = -beta * (call["logprobs"] - call["ref"]) * call["mask"]
        last = call["mask"].sum(1).long() - 1
        expected[torch.arange(len(last)), last] += call["scores"]
        assert torch.allclose(rewards, expected, atol=1e-5)
        moved += ((call["logprobs"] - call["ref"]).abs() * call["mask"]).sum().item()
    assert moved > 1e-3  # the policy left pi_ref, so the KL term is not zero


def test_ratio_is_taken_against_the_rollout_policy(ppo_record):
    """From the second iteration on the policy is not pi_ref, and the first (only) epoch's ratio is
    still exactly 1: old log-probs come from the current model, per minibatch (Tulu 2.5 App. G)."""
    later = [call for call in ppo_record["loss"] if call["iteration"] >= 2]
    assert len(later) == 2
    for call in later:
        ratio = call["ratio"][call["mask"].bool()]
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)


def test_advantages_fed_to_the_loss_are_whitened_over_the_minibatch(ppo_record):
    for call in ppo_record["loss"]:
        mask = call["mask"].bool()
        adv = call["advantages"][mask]
        assert abs(adv.mean().item()) < 1e-5
        assert adv.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-3)


def test_reward_head_starts_at_std_one_over_sqrt_hidden():
    model = reward_model.load_reward_model(str(TOY / "sft"), 0, False)
    hidden = model.config.hidden_size
    weight = model.score.weight
    assert weight.std().item() == pytest.approx(1 / math.sqrt(hidden + 1), rel=0.25)
    assert weight.std().item() > 2 * model.config.initializer_range  # not transformers' default init


def test_dpo_main_feeds_dpo_loss_the_arguments(tmp_path, monkeypatch):
    """main passes --beta, --label_smoothing and --loss_type to dpo_loss, and logs the mean of the losses
    it returns (a hard-coded beta in the loop would still learn, and pass every other test)."""
    calls, real = [], dpo.dpo_loss

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out[0].detach().mean().item()))
        return out
    monkeypatch.setattr(dpo, "dpo_loss", recording)
    out = tmp_path / "dpo"
    dpo.main(dpo.Args(max_steps=2, batch_size=4, max_train_samples=8, eval_split=None, reward_model="none",
                      beta=0.37, label_smoothing=0.1, log_every=1, output_dir=str(out)))
    assert len(calls) == 2
    for args, kwargs, _ in calls:
        assert args[4:] == (0.37, 0.1, "sigmoid") and not kwargs, (args[4:], kwargs)
    logged = [json.loads(line)["train/loss"] for line in open(out / "metrics.jsonl")]
    assert logged == pytest.approx([mean for *_, mean in calls], abs=1e-6)


@pytest.mark.parametrize("batch_size,accumulation", [(8, 1), (4, 2)])
def test_sft_step_loss_is_the_token_mean_over_the_whole_step(batch_size, accumulation, tmp_path):
    """The first step's logged loss is the mean NLL per response token of the step's 8 rows, with or
    without gradient accumulation (a mean per micro-batch, or a sum, would differ)."""
    out = tmp_path / "sft"
    sft.main(sft.Args(model=str(TOY / "sft"), max_steps=1, batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, max_train_samples=8, eval_split=None,
                      num_samples=0, log_every=1, output_dir=str(out)))
    tok = sft.load_tokenizer(str(TOY / "sft"), False)
    rows = [json.loads(line) for line in open(TOY / "data" / "sft" / "train.jsonl")][:8]
    examples = sft.build_examples(rows, tok, 1024, sft.stop_token_ids(tok, str(TOY / "sft")))
    model = sft.load_model(str(TOY / "sft"), False)
    expected = sft.evaluate_loss(model, examples, 8, tok.pad_token_id, torch.device("cpu"),
                                 torch.autocast("cpu", enabled=False))
    logged = json.loads(open(out / "metrics.jsonl").readline())["train/loss"]
    assert logged == pytest.approx(expected, rel=1e-5)
