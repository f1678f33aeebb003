"""reward_model.py: the Bradley-Terry loss, reading the score, data formats, a smoke run that learns,
and the committed toy/rm."""

import json
import math
import statistics

import pytest
import torch

import reward_model as rm
from conftest import TOY
from toy.make import gold_reward


def test_bradley_terry_loss_identities():
    torch.manual_seed(0)
    a, b = torch.randn(64) * 3, torch.randn(64) * 3
    assert torch.allclose(rm.bradley_terry_loss(a, a), torch.full((64,), math.log(2)))
    assert torch.allclose(rm.bradley_terry_loss(a, b) - rm.bradley_terry_loss(b, a), b - a, atol=1e-5)
    margin = (a - b).requires_grad_()
    rm.bradley_terry_loss(margin, torch.zeros(64)).sum().backward()
    assert torch.allclose(margin.grad, torch.sigmoid(margin.detach()) - 1, atol=1e-6)  # fp32 1 - sigmoid


@pytest.fixture(scope="module")
def toy_rm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (AutoModelForSequenceClassification.from_pretrained(TOY / "rm").eval(),
            AutoTokenizer.from_pretrained(TOY / "rm"))


def test_score_reads_the_last_real_token_with_either_padding(toy_rm):
    model, tok = toy_rm
    texts = ["<|bos|><|user|>How was the cake?<|end|><|assistant|>It was good.<|end|>",
             "<|bos|><|user|>How was the soup from yesterday?<|end|><|assistant|>The soup was awful. "
             "I would not recommend it.<|end|>"]
    with torch.no_grad():
        alone = torch.stack([rm.score(model, **tok(t, return_tensors="pt", add_special_tokens=False))[0]
                             for t in texts])
        hidden = model.model(**tok(texts[0], return_tensors="pt", add_special_tokens=False)).last_hidden_state
        by_hand = model.score(hidden[0, -1]).squeeze()
        for side in ["left", "right"]:
            tok.padding_side = side
            batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            assert torch.allclose(rm.score(model, **batch), alone, atol=1e-5), side
    assert torch.allclose(alone[0], by_hand, atol=1e-5)
    assert model.config.pad_token_id == tok.pad_token_id


def test_concatenated_forward_equals_separate_forwards(toy_rm):
    model, tok = toy_rm
    rows = [json.loads(line) for line in open(TOY / "data" / "prefs" / "test.jsonl")][:6]
    pairs = rm.build_pairs(rows, tok, 1024, [tok.eos_token_id])
    batch = rm.collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        together = rm.score(model, **batch)
        apart = [rm.score(model, torch.tensor([p[side]]), torch.ones(1, len(p[side]), dtype=torch.long))[0]
                 for side in ["chosen", "rejected"] for p in pairs]
    assert torch.allclose(together, torch.stack(apart), atol=1e-5)


def test_formats_string_conversational_and_implicit_prompt(toy_rm):
    _, tok = toy_rm
    conv = {"prompt": [{"role": "user", "content": "How was the cake?"}],
            "chosen": [{"role": "assistant", "content": "It was good."}],
            "rejected": [{"role": "assistant", "content": "It was bad."}]}
    implicit = {"chosen": conv["prompt"] + conv["chosen"], "rejected": conv["prompt"] + conv["rejected"]}
    string = {"prompt": "How was the cake?", "chosen": " It was good.", "rejected": " It was bad."}
    a, b, c = (rm.build_pairs([row], tok, 1024, [tok.eos_token_id])[0] for row in (conv, implicit, string))
    assert a == b
    assert tok.decode(a["chosen"]) == ("<|bos|><|user|>How was the cake?<|end|>"
                                       "<|assistant|>It was good.<|end|>")
    assert tok.decode(c["rejected"]) == "How was the cake? It was bad.<|end|>"
    long = conv | {"chosen": [{"role": "assistant", "content": "good " * 50}]}
    assert len(rm.build_pairs([conv, long], tok, 20, [tok.eos_token_id])) == 1
    with pytest.raises(SystemExit, match="every pair is longer"):  # too long: skipped, never truncated
        rm.build_pairs([conv], tok, 10, [tok.eos_token_id])


def test_missing_columns_fail_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(SystemExit, match=r"has columns \['prompt', 'chosen'\]; it needs chosen\+rejected"):
        rm.main(rm.Args(dataset=str(bad), output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_smoke_run_learns(tmp_path):
    """A few seconds of training from toy/sft: held-out pairwise accuracy well above chance."""
    out = tmp_path / "rm"
    results = rm.main(rm.Args(output_dir=str(out), max_steps=60, batch_size=16, learning_rate=1e-3,
                              max_train_samples=960, max_eval_samples=256, eval_every=0, log_every=10))
    assert results["eval/accuracy"] > 0.62 and results["eval/margin"] > 0
    first = json.loads(open(out / "metrics.jsonl").readline())
    assert results["eval/loss"] < first["train/loss"]
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.pad_token_id == 0 and reloaded.config.num_labels == 1


def test_committed_reward_model_ranks_and_tracks_gold(toy_rm, sft_samples):
    """toy/rm on held-out pairs is near the Bayes ceiling, and on fresh toy/sft samples its scores
    follow the gold reward."""
    model, tok = toy_rm
    bayes = json.load(open(TOY / "data" / "stats.json"))["prefs/test"]["bayes_accuracy"]
    pairs = rm.build_pairs([json.loads(line) for line in open(TOY / "data" / "prefs" / "test.jsonl")],
                           tok, 1024, [tok.eos_token_id])
    metrics = rm.evaluate(model, pairs, 128, tok.pad_token_id, torch.device("cpu"),
                          torch.autocast("cpu", enabled=False))
    assert metrics["eval/accuracy"] > bayes - 0.05

    prompts, responses = sft_samples
    tok.padding_side = "right"
    texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
             for p, r in zip(prompts, responses)]
    with torch.no_grad():
        scores = torch.cat([rm.score(model, **tok(texts[i : i + 128], return_tensors="pt", padding=True,
                                                  add_special_tokens=False))
                            for i in range(0, len(texts), 128)])
    gold = torch.tensor([gold_reward(p[-1]["content"], r) for p, r in zip(prompts, responses)])
    pearson = torch.corrcoef(torch.stack([scores, gold]))[0, 1].item()
    assert pearson > 0.7, pearson  # 0.77 measured: samples stray further from the data than the pairs
    assert statistics.pstdev(scores.tolist()) > 0.5
