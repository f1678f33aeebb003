"""sft.py: the loss, the tokenisation of prompt and response, a smoke run that learns, bad input, and
the committed toy/sft."""

import json
import math
import statistics

import pytest
import torch

import sft
from conftest import TOY
from toy.make import gold_reward, is_grammatical


def test_loss_counts_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 6]])
    expected = -sum(torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
                    for b in range(2) for t in range(1, 5) if labels[b, t] != -100)
    assert torch.allclose(sft.sft_loss_sum(logits, labels), expected)
    logits2 = logits.clone()
    logits2[0, 0] += 10.0  # position 0 predicts token 1, a prompt token: no effect
    assert torch.allclose(sft.sft_loss_sum(logits2, labels), expected)


def test_lr_schedule():
    assert sft.lr_factor(0, 100, 10, "linear") == 0.0
    assert sft.lr_factor(5, 100, 10, "linear") == 0.5
    assert sft.lr_factor(10, 100, 10, "linear") == 1.0
    assert sft.lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert sft.lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert sft.lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert sft.lr_factor(100, 100, 10, "linear", floor=0.1) == pytest.approx(0.1)
    assert sft.lr_factor(55, 100, 10, "linear", floor=0.1) == pytest.approx(0.55)
    assert sft.lr_factor(5, 100, 10, "constant") == 0.5 and sft.lr_factor(90, 100, 10, "constant") == 1.0


@pytest.fixture(scope="module")
def toy_tokenizer():
    return sft.load_tokenizer(str(TOY / "base"), False)


def test_tokenize_conversation(toy_tokenizer):
    tok = toy_tokenizer
    prompt = [{"role": "user", "content": "How was the cake?"}]
    prompt_ids, completion_ids = sft.tokenize_example(
        tok, prompt, [{"role": "assistant", "content": "It was good."}], 1024, [tok.eos_token_id])
    assert tok.convert_ids_to_tokens(prompt_ids)[-1] == "<|assistant|>"
    assert tok.decode(completion_ids) == "It was good.<|end|>"
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "It was good."}],
                                   return_dict=False)
    assert prompt_ids + completion_ids == full
    _, cut = sft.tokenize_example(tok, prompt, [{"role": "assistant", "content": "It was good."}],
                                  len(prompt_ids) + 2, [tok.eos_token_id])
    assert len(cut) == 2


def test_tokenize_strings_appends_eos(toy_tokenizer):
    prompt_ids, completion_ids = sft.tokenize_example(toy_tokenizer, "How was the cake?", " Good.", 1024,
                                                      [toy_tokenizer.eos_token_id])
    assert completion_ids[-1] == toy_tokenizer.eos_token_id
    assert toy_tokenizer.decode(prompt_ids + completion_ids) == "How was the cake? Good.<|end|>"


def test_smoke_run_learns(tmp_path):
    """From random weights, 60 steps on the toy: the eval loss falls well below its first value."""
    out = tmp_path / "run"
    results = sft.main(sft.Args(output_dir=str(out), max_steps=60, batch_size=16, max_train_samples=960,
                                max_eval_samples=64, eval_every=10, log_every=10, num_samples=4,
                                max_new_tokens=48))
    evals = [r["eval/loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "eval/loss" in r]
    assert len(evals) == 6 and evals[-1] < evals[0] - 0.5 and evals[-1] < 0.5 * math.log(592)
    assert results["eval/loss"] == evals[-1] and results["perf/tokens_per_s"] > 0
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 4 and all(isinstance(s["response"], str) for s in samples)
    assert json.load(open(out / "args.json"))["max_steps"] == 60
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # a loadable checkpoint, nothing left half-written
    assert sum(p.numel() for p in model.parameters()) > 1e6 and not (out / ".saving").exists()


def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit, match="not found"):
        sft.main(sft.Args(dataset=str(tmp_path / "missing"), output_dir=str(tmp_path / "a")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(SystemExit, match=r"columns \['text'\].*needs messages or prompt\+completion"):
        sft.main(sft.Args(dataset=str(bad), eval_split=None, output_dir=str(tmp_path / "b")))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "model.safetensors").write_text("precious")
    with pytest.raises(SystemExit, match="already holds a run.*--resume"):
        sft.main(sft.Args(output_dir=str(busy)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in busy.iterdir()] == ["model.safetensors"]
    assert (busy / "model.safetensors").read_text() == "precious"


def test_committed_sft_model_is_grammatical_with_headroom(sft_samples):
    """The toy's pi_sft at temperature 1: mostly grammatical, and its gold reward near the
    demonstrations' (so alignment has headroom above it)."""
    prompts, responses = sft_samples
    grammatical = sum(map(is_grammatical, responses)) / len(responses)
    rewards = [gold_reward(p[-1]["content"], r) for p, r in zip(prompts, responses)]
    data = json.load(open(TOY / "data" / "stats.json"))["sft/train"]["gold_reward"]
    assert grammatical >= 0.85
    assert abs(statistics.mean(rewards) - data["mean"]) < 0.6 and statistics.mean(rewards) < 2.0
