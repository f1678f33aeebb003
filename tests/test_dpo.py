"""dpo.py: the loss and its variants, log-probs, --eval_every, a smoke run that learns, bad input,
and the committed toy/dpo."""

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import dpo
from conftest import TOY, sample_responses
from toy.make import gold_reward, is_grammatical

CPU, NO_AUTOCAST = torch.device("cpu"), torch.autocast("cpu", enabled=False)


def random_logps(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-30 * torch.rand(n, generator=g) for _ in range(4)]


def test_dpo_loss_matches_the_formula():
    pc, pr, rc, rr = random_logps()
    for beta in [0.1, 0.5]:
        losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, beta)
        assert torch.allclose(losses, -F.logsigmoid(beta * ((pc - rc) - (pr - rr))))
        assert (torch.allclose(chosen_rewards, beta * (pc - rc))
                and torch.allclose(rejected_rewards, beta * (pr - rr)))


def test_dpo_at_the_reference_is_log2_with_zero_rewards():
    pc, pr, _, _ = random_logps()
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, pc, pr, 0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr, rc, rr = random_logps()
    pc.requires_grad_(), pr.requires_grad_()
    dpo.dpo_loss(pc, pr, rc, rr, 0.1)[0].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises log pi(y_c) and lowers log pi(y_r)


def test_ipo_and_label_smoothing():
    pc, pr, rc, rr = random_logps()
    h = (pc - rc) - (pr - rr)
    assert torch.allclose(dpo.dpo_loss(pc, pr, rc, rr, 0.2, loss_type="ipo")[0], (h - 1 / (2 * 0.2)) ** 2)
    smooth = dpo.dpo_loss(pc, pr, rc, rr, 0.1, label_smoothing=0.2)[0]
    assert torch.allclose(smooth, -0.8 * F.logsigmoid(0.1 * h) - 0.2 * F.logsigmoid(-0.1 * h))
    half = dpo.dpo_loss(pc, pr, rc, rr, 0.1, label_smoothing=0.5)[0]  # labels uninformative: no preference
    assert torch.allclose(half, dpo.dpo_loss(pr, pc, rr, rc, 0.1, label_smoothing=0.5)[0])


def test_sequence_logps_sums_labelled_tokens_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5).bfloat16()
    labels = torch.tensor([[-100, 2, 3, -100], [-100, -100, 4, 1]])
    logprobs = torch.log_softmax(logits.float(), -1)
    expected = torch.stack([logprobs[0, 0, 2] + logprobs[0, 1, 3], logprobs[1, 1, 4] + logprobs[1, 2, 1]])
    out = dpo.sequence_logps(logits, labels)
    assert out.dtype == torch.float32 and torch.allclose(out, expected)


@pytest.fixture(scope="module")
def policy_and_pairs():
    tokenizer = dpo.load_tokenizer(str(TOY / "sft"), False)
    rows = [json.loads(line) for line in open(TOY / "data" / "prefs" / "test.jsonl")][:8]
    return dpo.load_model(str(TOY / "sft"), False).eval(), tokenizer, dpo.build_pairs(rows, tokenizer, 1024,
                                                                                [tokenizer.eos_token_id])


def test_concatenated_forward_equals_separate_forwards(policy_and_pairs):
    """Chosen and rejected of different lengths in one batch (prompts left-padded, responses
    right-padded) give the log-probs of each sequence alone, and of a batch padded differently."""
    model, tok, pairs = policy_and_pairs
    with torch.no_grad():
        together = dpo.batch_logps(model, dpo.collate_pairs(pairs, tok.pad_token_id), NO_AUTOCAST)
        alone = torch.stack([dpo.batch_logps(model, dpo.collate_pairs([p], tok.pad_token_id), NO_AUTOCAST)[k]
                             for k in (0, 1) for p in pairs])
        chosen, rejected = dpo.batch_logps(model, dpo.collate_pairs(pairs[:2], tok.pad_token_id),
                                           NO_AUTOCAST).chunk(2)
    lengths = {len(p[s]["input_ids"]) for p in pairs for s in ("chosen", "rejected")}
    assert len(lengths) > 3  # the batch really is padded
    assert torch.allclose(together, alone, atol=1e-4)
    n = len(pairs)
    assert torch.allclose(chosen, alone[:2], atol=1e-4) and torch.allclose(rejected, alone[n : n + 2], atol=1e-4)


def run_small(tmp_path, name, **kw):
    args = dict(output_dir=str(tmp_path / name), max_steps=6, batch_size=8, max_train_samples=48,
                max_eval_samples=32, reward_model="none", log_every=1, learning_rate=1e-4)
    args.update(kw)
    results = dpo.main(dpo.Args(**args))
    return results, [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]


def test_eval_every_leaves_the_training_as_it_was(tmp_path):
    """--eval_every (held-out metrics at step 3) leaves the training exactly as it was."""
    a, log_a = run_small(tmp_path, "plain")
    b, log_b = run_small(tmp_path, "evals", eval_every=3)
    held_out = [r for r in log_b if "eval/loss" in r]
    assert [r["step"] for r in held_out] == [3] and held_out[0]["eval/loss"] < math.log(2)
    log_b = [r for r in log_b if "train/loss" in r]
    assert len(log_a) == len(log_b) == 6
    for ra, rb in zip(log_a, log_b):
        for key in ["train/loss", "rewards/chosen", "rewards/rejected", "logps/chosen"]:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), key
    assert a["eval/loss"] == pytest.approx(b["eval/loss"], rel=1e-4)
    assert log_a[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1: policy = reference


def test_smoke_run_learns(tmp_path):
    """Seconds of DPO from toy/sft: held-out implicit-reward accuracy clearly above chance, and the
    sampling evaluation (before training, at step 20 and at the end) writes scored samples."""
    results, log = run_small(tmp_path, "smoke", max_steps=40, batch_size=16, max_train_samples=640,
                             max_eval_samples=256, learning_rate=3e-4, log_every=10, reward_model="toy/rm",
                             num_eval_prompts=16, max_new_tokens=48, sample_every=20)
    sampled = [r for r in log if "eval/score" in r]
    trained = [r for r in log if "train/loss" in r]
    assert [r["step"] for r in sampled] == [0, 20] and [r["step"] for r in trained] == [10, 20, 30, 40]
    assert sampled[0]["eval/kl"] == 0  # before training the policy is the reference
    assert sampled[1]["eval/kl"] > 0 and (tmp_path / "smoke" / "samples" / "step_000020.jsonl").exists()
    assert results["eval/rewards/accuracy"] > 0.6 and results["eval/rewards/margin"] > 0
    assert results["eval/loss"] < math.log(2) and trained[-1]["train/loss"] < trained[0]["train/loss"]
    samples = [json.loads(line) for line in open(tmp_path / "smoke" / "samples.jsonl")]
    assert len(samples) == 16 and {"prompt", "response", "score", "logratio"} <= set(samples[0])
    assert results["eval/kl"] == pytest.approx(statistics.mean(s["logratio"] for s in samples))
    assert 0 <= results["eval/eos_rate"] <= 1 and results["eval/length"] > 3


def test_tokenizer_without_pad_token_falls_back_to_eos(tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOY / "sft")
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = dpo.load_tokenizer(str(tmp_path / "tok"), False)
    assert loaded.pad_token_id == loaded.eos_token_id and "no pad token" in capsys.readouterr().out


def test_bad_input_fails_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    with pytest.raises(SystemExit, match="it needs chosen\\+rejected"):
        dpo.main(dpo.Args(dataset=str(bad), eval_split=None, output_dir=str(tmp_path / "out")))
    with pytest.raises(SystemExit, match="--sample_every needs"):  # nothing would score the samples
        dpo.main(dpo.Args(reward_model="none", sample_every=10, output_dir=str(tmp_path / "out")))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOY / "sft")
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="different vocabulary"):
        dpo.main(dpo.Args(reward_model=str(tmp_path / "other"), output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_committed_dpo_beats_sft_and_stays_grammatical(sft_samples):
    prompts, sft_responses = sft_samples
    dpo_responses = sample_responses(TOY / "dpo", prompts)
    gold = {name: [gold_reward(p[-1]["content"], r) for p, r in zip(prompts, responses)]
            for name, responses in [("sft", sft_responses), ("dpo", dpo_responses)]}
    se = statistics.stdev(gold["dpo"]) / math.sqrt(len(prompts))
    assert statistics.mean(gold["dpo"]) > statistics.mean(gold["sft"]) + max(1.0, 5 * se)
    assert sum(map(is_grammatical, dpo_responses)) / len(prompts) >= 0.75
