"""Preference rows without a `prompt` column (Anthropic HH-RLHF's shape): the prompt is what the two sides
share. Three real-shaped rows with the prompt written by hand: the split equals it in every script that
reads pairs, and DPO's implicit rewards equal those of the same rows given with that explicit prompt."""

import json

import pytest

import dpo
import reward_model
import var
from conftest import TOY

A = "\n\nAssistant:"
HH = [  # (the prompt by hand, the chosen reply, the rejected reply)
    ("\n\nHuman: How was the pizza?" + A, " It was great, and the crust was crisp.", " It was bad."),
    ("\n\nHuman: Write a review of the cake." + A + " Do you want it short?\n\nHuman: Yes, short." + A,
     " The cake was lovely.", " The cake was dry and the icing was bad."),
    # the replies share their first words: the split stays after the last marker, not inside the replies
    ("\n\nHuman: And the soup?" + A, " I think it was warm and good.", " I think it was cold."),
]
ROWS = [{"chosen": p + c, "rejected": p + r} for p, c, r in HH]
EXPLICIT = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in HH]


@pytest.mark.parametrize("script", [dpo, reward_model, var])
def test_the_split_is_the_prompt_written_by_hand(script):
    assert [script.split_pair(row) for row in ROWS] == HH


def test_message_lists_split_after_their_common_messages():
    turns = [{"role": "user", "content": "How was the pizza?"}, {"role": "assistant", "content": "Hot?"},
             {"role": "user", "content": "Yes."}]
    chosen, rejected = [{"role": "assistant", "content": "Great."}], [{"role": "assistant", "content": "Bad."}]
    assert dpo.split_pair({"chosen": turns + chosen, "rejected": turns + rejected}) == (turns, chosen, rejected)
    two_replies = {"chosen": turns + chosen + turns[:1] + chosen, "rejected": turns + rejected + turns[:1] + chosen}
    assert dpo.split_pair(two_replies) is None  # more than one final assistant message after the split
    assert dpo.split_pair({"chosen": chosen, "rejected": rejected}) is None  # nothing shared: no prompt


def test_without_a_marker_the_split_is_at_a_word_boundary_and_rows_without_one_are_dropped(capsys):
    assert dpo.split_pair({"chosen": "The soup was hot", "rejected": "The soup was holy"}) == (
        "The soup was", " hot", " holy")  # never inside the word both sides start; the space with the reply
    assert dpo.split_pair({"chosen": "Same.", "rejected": "Same."}) is None
    assert dpo.split_pair({"chosen": "Short", "rejected": "Short and longer"}) is None
    kept = dpo.split_pairs(ROWS + [{"chosen": "Same.", "rejected": "Same."}], "rows")
    assert kept == HH and "rows: dropped 1 of 4 pairs with no prompt to split off" in capsys.readouterr().out


def test_dry_run_marks_the_replies_alone_as_loss_tokens(tmp_path, capsys):
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    dpo.main(dpo.Args(dataset=str(data), train_split="train", eval_split=None, dry_run=True, reward_model="none",
                      batch_size=1))
    shown = capsys.readouterr().out
    assert "Assistant:[[ It was great" in shown and "[[" not in shown.split("Human:")[1].split("Assistant:")[0]


def test_var_groups_the_replies_under_their_prompts():
    tok = var.load_tokenizer(str(TOY / "sft"), False)
    stops = [tok.eos_token_id]
    assert var.build_units(ROWS, tok, "both", 1024, stops) == var.build_units(EXPLICIT, tok, "both", 1024, stops)


def test_implicit_rewards_equal_those_of_the_explicit_prompt():
    """toy/dpo against its reference toy/sft: the logged implicit rewards and log-probs of the HH rows equal
    those of the same rows with the prompt given (not the whole conversation counted as the response)."""
    import torch

    tok = dpo.load_tokenizer(str(TOY / "sft"), False)
    policy, ref = (dpo.load_model(str(TOY / name), False).eval() for name in ("dpo", "sft"))
    args, autocast = dpo.Args(), torch.autocast("cpu", enabled=False)
    metrics = []
    for rows in (ROWS, EXPLICIT):
        pairs = dpo.build_pairs(rows, tok, 1024, [tok.eos_token_id])
        dpo.add_ref_logps(ref, pairs, 8, tok.pad_token_id, "cpu", autocast)
        with torch.no_grad():
            metrics.append(dpo.pair_losses(policy, pairs, args, tok.pad_token_id, "cpu", autocast)[1])
    assert metrics[0] == metrics[1] and metrics[0]["rewards/margin"] != 0
