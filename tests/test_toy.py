"""The toy world: gold reward, grammar, Bradley-Terry labels, and that the committed files are what
toy/make.py writes."""

import json
import math
import random

import pytest

from conftest import TOY
from toy.make import (ITEMS, MODIFIERS, gold_reward, is_grammatical, make_base, make_data, prompt_items,
                      sample_response, sigmoid)

PIZZA = "Write a review of the pizza."


@pytest.mark.parametrize("response, reward", [
    ("The pizza was great.", 2 + 1),                           # sentiment + names the item
    ("The pizza was very good.", 1.5 * 1 + 1),                 # intensifier
    ("The pizza was not great.", -0.5 * 2 + 1),                # negation
    ("I would not recommend the pizza.", -0.5 * 1 + 1),
    ("It was awful. I hated it.", -2 - 2),                     # on topic but never names the item
    ("The burger was great.", -1),                             # off topic: sentiment does not count
    ("The pizza was great, but the burger was awful.", 2 - 1 + 1),
    ("The price was okay.", 0),
    ("The pizza was great great great.", 3 * 2 + 1),           # over-optimisation: repeated praise
    ("pizza pizza", 1),
    ("", 0),
])
def test_gold_reward_hand_written(response, reward):
    assert gold_reward(PIZZA, response) == pytest.approx(reward)


def test_gold_reward_reads_the_prompt_topic():
    assert prompt_items("How was the laptop you bought?") == {"laptop"}
    assert gold_reward("How was the laptop you bought?", "The pizza was great.") == -1
    assert gold_reward("How was the laptop you bought?", "The laptop was great.") == 3


def test_grammar_accepts_everything_it_generates():
    rng = random.Random(1)
    for _ in range(3000):
        response = sample_response(rng, rng.choice(ITEMS))
        assert is_grammatical(response), response


def test_grammar_accepts_the_committed_data():
    for split in ["train", "test"]:
        for line in open(TOY / "data" / "prefs" / f"{split}.jsonl"):
            row = json.loads(line)
            assert (is_grammatical(row["chosen"][0]["content"])
                    and is_grammatical(row["rejected"][0]["content"]))


def corruptions(response: str, rng: random.Random) -> list:
    words = response.split(" ")
    i = rng.randrange(len(words))
    j = rng.randrange(len(words) - 1)
    # dropping "very" stays grammatical
    k = rng.choice([n for n, w in enumerate(words) if w not in MODIFIERS])
    swapped = words[:j] + [words[j + 1], words[j]] + words[j + 2 :]
    return [
        " ".join(words[:i] + [words[i]] + words[i:]),            # a word repeated
        " ".join(swapped) if words[j] != words[j + 1] else "x",  # two neighbours swapped
        " ".join(words[:k] + words[k + 1 :]),                    # a word dropped
        response[:-1],                                            # final period dropped
        response[0].lower() + response[1:],                       # not capitalised
        " ".join(words[:i] + ["delicious"] + words[i:]),          # a word outside the grammar
        response + " The pizza was great." * 3,                   # more than three sentences
        response + " ",                                           # trailing space
    ]


def test_grammar_rejects_corrupted_text():
    rng = random.Random(2)
    for _ in range(500):
        response = sample_response(rng, rng.choice(ITEMS))
        for bad in corruptions(response, rng):
            assert not is_grammatical(bad), (response, bad)
    assert not is_grammatical("The pizza was great great great.")
    assert not is_grammatical("")


def test_preference_labels_follow_bradley_terry():
    """Under Bradley-Terry labelling, the chosen response has the higher gold reward with probability
    sigmoid(|r_a - r_b|): checked per bin of |r_a - r_b|, within 4 standard errors. An argmax
    labeller (always right) or a coin flip would fail the bins."""
    rows = [json.loads(line) for line in open(TOY / "data" / "prefs" / "train.jsonl")]
    bins = {(0.25, 1.25): [], (1.25, 2.5): [], (2.5, 4.0): [], (4.0, 100.0): []}
    for row in rows:
        prompt = row["prompt"][0]["content"]
        delta = (gold_reward(prompt, row["chosen"][0]["content"])
                 - gold_reward(prompt, row["rejected"][0]["content"]))
        for lo, hi in bins:
            if lo <= abs(delta) < hi:
                bins[(lo, hi)].append((delta > 0, sigmoid(abs(delta))))
    for (lo, hi), pairs in bins.items():
        observed = sum(agree for agree, _ in pairs) / len(pairs)
        expected = sum(p for _, p in pairs) / len(pairs)
        se = math.sqrt(expected * (1 - expected) / len(pairs))
        assert len(pairs) > 200 and abs(observed - expected) < 4 * se, ((lo, hi), observed, expected)
    stats = json.load(open(TOY / "data" / "stats.json"))
    assert 0.8 < stats["prefs/test"]["bayes_accuracy"] < 0.95


def test_committed_data_and_tokenizer_are_what_make_writes(tmp_path):
    make_data(tmp_path / "data")
    make_base(tmp_path / "base", tmp_path / "data")
    for rel in ["data/stats.json", "data/sft/train.jsonl", "data/sft/test.jsonl", "data/prefs/train.jsonl",
                "data/prefs/test.jsonl", "data/prompts/train.jsonl", "data/prompts/validation.jsonl",
                "data/prompts/test.jsonl", "base/tokenizer.json", "base/config.json",
                "base/chat_template.jinja", "base/generation_config.json"]:
        assert (tmp_path / rel).read_bytes() == (TOY / rel).read_bytes(), rel


def test_datasets_load_like_hub_names():
    from datasets import load_dataset

    prefs = load_dataset(str(TOY / "data" / "prefs"))
    assert set(prefs) == {"train", "test"} and prefs["train"].column_names == ["prompt", "chosen", "rejected"]
    prompts = load_dataset(str(TOY / "data" / "prompts"))
    assert set(prompts) == {"train", "validation", "test"}
    assert load_dataset(str(TOY / "data" / "sft"), split="test").column_names == ["messages"]


def test_chat_template_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOY / "base")
    messages = [{"role": "user", "content": "How was the cake?"},
                {"role": "assistant", "content": "It was good."}]
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=False)
    full = tok.apply_chat_template(messages, return_dict=False)
    assert tok.convert_ids_to_tokens(full) == ["<|bos|>", "<|user|>", "How", "Ġwas", "Ġthe", "Ġcake", "?",
                                               "<|end|>", "<|assistant|>", "It", "Ġwas", "Ġgood", ".",
                                               "<|end|>"]
    assert full[: len(prompt)] == prompt and full[-1] == tok.eos_token_id
    assert tok.pad_token_id not in full and tok.pad_token_id != tok.eos_token_id
