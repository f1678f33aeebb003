"""The algorithms wired right inside main, not just their helpers: tests on the quantities a broken
wiring changes (issues 19 and 29). Each run records what main feeds the maths functions (wrapped with
`record` or, for PPO, by hand) and checks it against the test's own reading of the data: its own
tokenisation of the rows (`chat_ids`) and its own reward-model forward (`reward`), never the scripts'
helpers. The mistakes these tests were proved against are kept, as data, in tests/mutations.py."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import dpo
import expo
import ppo
import reward_model
import sft
import var
from conftest import TOY


def read_jsonl(path) -> list:
    return [json.loads(line) for line in open(path)]


def record(monkeypatch, module, name: str) -> list:
    """Wraps module.name; every call's positional arguments (tensors detached and cloned) go to the list."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append([a.detach().clone() if torch.is_tensor(a) else a for a in args] + [kwargs])
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def chat_ids(tokenizer, prompt: list, response: list) -> tuple:
    """The test's own reading of a chat row: (prompt ids with the generation prompt, response ids
    through its end-of-turn token), from the chat template alone."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    assert full_text.startswith(prompt_text)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids[: response_ids.index(tokenizer.eos_token_id) + 1]


@torch.no_grad()
def head_outputs(model, ids: list) -> torch.Tensor:
    """A scalar model's head at every position of one unpadded sequence, (T,)."""
    hidden = getattr(model, model.base_model_prefix)(torch.tensor([ids])).last_hidden_state
    return model.score(hidden[0]).squeeze(-1)


def reward(model, ids: list) -> float:
    """The reward model's head at the last token of one unpadded sequence."""
    return head_outputs(model, ids)[-1].item()


@torch.no_grad()
def token_logprobs(model, prompt_ids: list, response_ids: list, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of each response token under logits / T, from one unpadded forward."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].double() / temperature
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt_ids):, None]).squeeze(-1)


def logp(model, prompt_ids: list, response_ids: list) -> float:
    """log pi(response | prompt), summed over the response tokens."""
    return token_logprobs(model, prompt_ids, response_ids).sum().item()


def distinct_prompt_rows(n: int) -> list:
    """The first n preference rows of the toy with n different prompts (a prompt-mixing mistake is
    invisible between rows that share one)."""
    rows, seen = [], set()
    for row in read_jsonl(TOY / "data" / "prefs" / "train.jsonl"):
        if row["prompt"][-1]["content"] not in seen:
            seen.add(row["prompt"][-1]["content"])
            rows.append(row)
    return rows[:n]


TINY = {  # one optimiser step of each trainer on a few toy rows, no evaluation
    "sft": dict(max_steps=1, batch_size=4, max_train_samples=4, eval_split=None, num_samples=0, log_every=1),
    "reward_model": dict(max_steps=1, batch_size=4, max_train_samples=4, eval_split=None, log_every=1),
    "dpo": dict(max_steps=1, batch_size=4, max_train_samples=4, eval_split=None, reward_model="none",
                log_every=1),
    "var": dict(max_steps=1, train_split="train[:4]", batch_size=4, eval_prompts="none", log_every=1),
    "ppo": dict(total_episodes=8, batch_size=8, minibatch_size=8, max_new_tokens=8, eval_split=None,
                log_every=1),
}


def step_gradients(script, out, **changes) -> list:
    """Runs script.main(Args(**changes)) for a step or two; returns, per optimiser step, the whole
    gradient as the optimiser received it (after any clipping), flattened."""
    grads = []

    def before_step(optimizer, args, kwargs):
        grads.append(torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"]
                                if p.grad is not None]).clone())
    hook = register_optimizer_step_pre_hook(before_step)
    try:
        script.main(script.Args(**{**TINY[script.__name__], "output_dir": str(out), **changes}))
    finally:
        hook.remove()
    return grads


@pytest.fixture(scope="module")
def ppo_record(tmp_path_factory):
    """Two iterations of 8 episodes, minibatches of 4, two PPO epochs, responses cut at 8 tokens (most
    never reach their stop token), a learning rate large enough that the policy leaves pi_ref in one
    iteration; gamma, lambda, the clip, the temperature and the missing-EOS penalty off their defaults,
    so that a default in their place shows;
    a checkpoint after the first iteration, whose models the tests run themselves."""
    record = {"iteration": 0, "rollouts": [], "steps": [], "eos": [], "kl": [], "gae": [], "loss": [],
              "value_loss": []}
    real = {name: getattr(ppo, name) for name in ("rollout", "take", "eos_trick", "kl_penalized_rewards",
                                                  "compute_gae", "ppo_policy_loss", "ppo_value_loss")}

    def rollout(*args, **kwargs):
        record["iteration"] += 1
        batch = real["rollout"](*args, **kwargs)
        record["rollouts"].append({k: v.clone() for k, v in batch.items()})
        record["batch"] = batch
        return batch

    def take(batch, index):
        part = real["take"](batch, index)
        if batch is record["batch"]:  # a step's episodes out of the rollout (not a pass's slice)
            record["last_take"] = part
            record["steps"].append(dict(iteration=record["iteration"], index=index.clone()))
        return part

    def eos_trick(scores, finished, penalty):
        record["eos"].append(dict(iteration=record["iteration"], scores=scores.clone(),
                                  finished=finished.clone()))
        return real["eos_trick"](scores, finished, penalty)

    def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta):
        record["kl"].append(dict(mb={k: v.clone() for k, v in record["last_take"].items()},
                                 scores=scores.clone(), logprobs=logprobs.clone(), ref=ref_logprobs.clone(),
                                 mask=mask.clone(), beta=beta))
        return real["kl_penalized_rewards"](scores, logprobs, ref_logprobs, mask, beta)

    def compute_gae(rewards, values, mask, gamma, lam):
        advantages, returns = real["compute_gae"](rewards, values, mask, gamma, lam)
        record["gae"].append(dict(rewards=rewards.clone(), values=values.clone(), gamma=gamma, lam=lam,
                                  returns=returns.clone()))
        return advantages, returns

    def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
        record["loss"].append(dict(iteration=record["iteration"],
                                   ratio=(logprobs - old_logprobs).exp().detach(), old=old_logprobs.clone(),
                                   advantages=advantages.clone(), mask=mask.clone(), clip=clip))
        return real["ppo_policy_loss"](logprobs, old_logprobs, advantages, mask, clip)

    def ppo_value_loss(values, old_values, returns, mask, clip):
        record["value_loss"].append(dict(clip=clip, old=old_values.clone(), returns=returns.clone(),
                                         mask=mask.clone()))
        return real["ppo_value_loss"](values, old_values, returns, mask, clip)

    patch = pytest.MonkeyPatch()
    for name, fn in [("rollout", rollout), ("take", take), ("eos_trick", eos_trick),
                     ("kl_penalized_rewards", kl_penalized_rewards), ("compute_gae", compute_gae),
                     ("ppo_policy_loss", ppo_policy_loss), ("ppo_value_loss", ppo_value_loss),
                     ("finish", lambda out, results, tracker: results)]:  # iteration 1's checkpoint stays
        patch.setattr(ppo, name, fn)
    args = ppo.Args(total_episodes=16, batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=8,
                    eval_split=None, learning_rate=1e-3, warmup_ratio=0.0, beta=0.5, gamma=0.99, lam=0.9,
                    clip=0.15, temperature=0.9, missing_eos_penalty=-7.0, log_every=1, save_every=1,
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
        cut = ~call["mb"]["finished"]
        unfinished += cut.sum().item()
        assert (call["scores"][cut] == penalty).all()
        assert (call["scores"][~cut] != penalty).all()
    assert unfinished > 0  # the trick was exercised


def test_token_rewards_fed_to_gae_carry_minus_beta_kl(ppo_record):
    beta = ppo_record["args"].beta
    assert len(ppo_record["kl"]) == len(ppo_record["gae"]) == 4  # 2 iterations x 2 minibatches
    moved = 0.0
    for call, gae in zip(ppo_record["kl"], ppo_record["gae"]):
        rewards = gae["rewards"]
        expected = -beta * (call["logprobs"] - call["ref"]) * call["mask"]
        last = call["mask"].sum(1).long() - 1
        expected[torch.arange(len(last)), last] += call["scores"]
        assert torch.allclose(rewards, expected, atol=1e-5)
        moved += ((call["logprobs"] - call["ref"]).abs() * call["mask"]).sum().item()
    assert moved > 1e-3  # the policy left pi_ref, so the KL term is not zero


def test_ratio_is_taken_against_the_rollout_policy(ppo_record):
    """The first epoch over a minibatch has a ratio of exactly 1, from the second iteration on too (the
    policy is not pi_ref then): old log-probs come from the current model, per minibatch (Tulu 2.5
    App. G). Every later epoch reuses those old log-probs, so after an optimiser step its ratio has
    moved off 1 (recomputing them before each epoch would keep it at 1, and clipping would never act)."""
    seen, later = [], []
    for call in ppo_record["loss"]:
        ratio = call["ratio"][call["mask"].bool()]
        if any(old.shape == call["old"].shape and torch.equal(old, call["old"]) for old in seen):
            later.append(ratio)
            continue
        seen.append(call["old"])
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    assert len(seen) == 4 and any(call["iteration"] >= 2 for call in ppo_record["loss"])  # 2 x 2 minibatches
    assert len(later) == len(seen) * (ppo_record["args"].ppo_epochs - 1), "no epoch reused the old log-probs"
    assert all((r - 1).abs().max() > 1e-3 for r in later)


def test_each_iterations_steps_are_a_random_partition_of_its_episodes(ppo_record):
    """Two optimiser steps of 4 episodes per iteration of 8: together they hold every episode once, and
    which episodes share a step is drawn anew (rollout order would put prompts' neighbours together)."""
    partitions = []
    for iteration in (1, 2):
        steps = [s["index"].tolist() for s in ppo_record["steps"] if s["iteration"] == iteration]
        assert [len(s) for s in steps] == [4, 4] and sorted(sum(steps, [])) == list(range(8))
        partitions.append({frozenset(s) for s in steps})
    assert partitions != [{frozenset(range(4)), frozenset(range(4, 8))}] * 2
    assert partitions[0] != partitions[1]


def test_the_losses_take_the_rollouts_old_log_probs_values_and_returns(ppo_record):
    """Each step's two epochs (passes j = 2s, 2s + 1) feed the policy loss the old log-probs the KL was
    taken with, and the value loss the values GAE was given and the returns it gave: in their places,
    where the second epoch's new log-probs and values have moved off them."""
    kl, gae = ppo_record["kl"], ppo_record["gae"]
    for j, (policy, value) in enumerate(zip(ppo_record["loss"], ppo_record["value_loss"], strict=True)):
        mask = value["mask"]
        assert torch.equal(policy["old"], kl[j // 2]["logprobs"])
        assert torch.equal(value["old"] * mask, gae[j // 2]["values"])
        assert torch.equal(value["returns"], gae[j // 2]["returns"])


def test_the_logged_kl_is_policy_over_reference(ppo_record):
    """Each iteration's logged objective/kl is the mean over its episodes of sum_t log pi - log pi_ref,
    as the KL penalty took them (its two steps' means, averaged)."""
    logged = read_jsonl(Path(ppo_record["args"].output_dir) / "metrics.jsonl")
    kls = [((c["logprobs"] - c["ref"]) * c["mask"]).sum(1).mean().item() for c in ppo_record["kl"]]
    assert [r["objective/kl"] for r in logged] == pytest.approx([sum(kls[:2]) / 2, sum(kls[2:]) / 2],
                                                                 abs=1e-5)
    assert abs(logged[1]["objective/kl"]) > 1e-3  # the policy has left pi_ref: a reversed sign shows


def test_scores_are_the_frozen_reward_models_at_each_stop_token(ppo_record):
    """The scores that enter the EOS trick are the frozen reward model's, read at the stop token of
    query + response: the test scores every finished rollout itself. The value model starts as a copy
    of the reward model and has moved by the second iteration, so scoring with it would show there."""
    model = AutoModelForSequenceClassification.from_pretrained(TOY / "rm").eval()
    for iteration, batch in enumerate(ppo_record["rollouts"], start=1):
        expected = sorted(reward(model, batch["query"][i][batch["query_mask"][i].bool()].tolist()
                                 + batch["response"][i][batch["mask"][i].bool()].tolist())
                          for i in range(len(batch["finished"])) if batch["finished"][i])
        got = sorted(x for call in ppo_record["eos"] if call["iteration"] == iteration
                     for x in call["scores"][call["finished"]].tolist())
        assert len(expected) > 0 and got == pytest.approx(expected, abs=1e-4)


def test_old_log_probs_reference_and_values_are_each_models_own(ppo_record):
    """The second iteration's first minibatch, token by token, against the test's own forwards of the
    models saved after the first iteration: the KL's two arguments are the log-probs under that policy
    and under pi_ref, in that order, at the rollout temperature; the values fed to GAE are the value
    model's, read at the position before each response token (not the reward model's, not shifted)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    policy = AutoModelForCausalLM.from_pretrained(TOY / "sft").eval()
    value_model = AutoModelForSequenceClassification.from_pretrained(TOY / "rm").eval()
    state = {"model": get_model_state_dict(torch.nn.ModuleList([policy, value_model]))}  # the models' tensors
    dcp.load(state, checkpoint_id=Path(ppo_record["args"].output_dir) / "checkpoint-000001", no_dist=True)
    ref = AutoModelForCausalLM.from_pretrained(TOY / "sft").eval()
    call, gae, temperature = ppo_record["kl"][2], ppo_record["gae"][2], ppo_record["args"].temperature
    mb = call["mb"]
    for i in range(len(mb["mask"])):
        query, n = mb["query"][i][mb["query_mask"][i].bool()].tolist(), int(mb["mask"][i].sum())
        response = mb["response"][i][:n].tolist()
        for model, got in ((policy, call["logprobs"]), (ref, call["ref"])):
            expected = token_logprobs(model, query, response, temperature)
            assert torch.allclose(got[i, :n].double(), expected, atol=1e-4)
        values = head_outputs(value_model, query + response)[len(query) - 1 : len(query) - 1 + n]
        assert torch.allclose(gae["values"][i, :n], values, atol=1e-4)


def test_kl_is_zero_before_the_first_update(ppo_record):
    """The first minibatch's policy is pi_ref itself: the log-probs of both, at the same temperature, are
    equal (pi_ref's taken at another temperature, or from another model, would not be)."""
    first = ppo_record["kl"][0]
    assert torch.allclose(first["logprobs"] * first["mask"], first["ref"] * first["mask"], atol=1e-5)


def test_main_passes_its_arguments_to_the_maths(ppo_record):
    """--beta, --gamma, --lam and --clip reach the functions that use them (a default left in their
    place learns just as well on the toy)."""
    args = ppo_record["args"]
    assert {c["beta"] for c in ppo_record["kl"]} == {args.beta}
    assert {(c["gamma"], c["lam"]) for c in ppo_record["gae"]} == {(args.gamma, args.lam)}
    assert {c["clip"] for c in ppo_record["loss"] + ppo_record["value_loss"]} == {args.clip}


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
    """main passes --beta, --label_smoothing and --loss_type to dpo_loss, and logs the means of the losses
    and of the implicit rewards' accuracy and margin, chosen over rejected, that it returns (a hard-coded
    beta in the loop would still learn, and pass every other test)."""
    calls, real = [], dpo.dpo_loss

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        losses, chosen, rejected = (x.detach() for x in out)
        calls.append((args, kwargs, losses.mean().item(), (chosen > rejected).float().mean().item(),
                      (chosen - rejected).mean().item()))
        return out
    monkeypatch.setattr(dpo, "dpo_loss", recording)
    out = tmp_path / "dpo"
    dpo.main(dpo.Args(max_steps=2, batch_size=4, max_train_samples=8, eval_split=None, reward_model="none",
                      beta=0.37, label_smoothing=0.1, log_every=1, output_dir=str(out)))
    assert len(calls) == 2
    for args, kwargs, *_ in calls:
        assert args[4:] == (0.37, 0.1, "sigmoid") and not kwargs, (args[4:], kwargs)
    logged = read_jsonl(out / "metrics.jsonl")
    for key, k in (("train/loss", 2), ("rewards/accuracy", 3), ("rewards/margin", 4)):
        assert [r[key] for r in logged] == pytest.approx([call[k] for call in calls], abs=1e-6), key
    assert logged[1]["rewards/accuracy"] != 0.5  # step 1 is at the reference (ties); a reversal shows here


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


def test_reward_model_trains_on_the_score_at_the_eos_when_pad_is_eos(tier, tmp_path, monkeypatch):
    """The rewards main feeds the Bradley-Terry loss are the head's output at each sequence's EOS, on the
    real-like tier with pad == eos, where transformers' own pooling (`model(**batch).logits`) reads
    the token before it (armed below). Dropout off in a copy, so train mode gives the same numbers."""
    rm_dir = tmp_path / "rm"
    shutil.copytree(tier["eos"]["rm"], rm_dir)
    config = json.loads((rm_dir / "config.json").read_text())
    (rm_dir / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.0}))
    data = tmp_path / "pairs.jsonl"
    rows = distinct_prompt_rows(4)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = record(monkeypatch, reward_model, "bradley_terry_loss")
    reward_model.main(reward_model.Args(model=str(rm_dir), dataset=str(data), train_split="train",
                                        **TINY["reward_model"], output_dir=str(tmp_path / "out")))
    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    chosen, rejected, _ = calls[0]
    for side, got in (("chosen", chosen), ("rejected", rejected)):
        expected = [reward(model, sum(chat_ids(tok, r["prompt"], r[side]), [])) for r in rows]
        assert sorted(got.tolist()) == pytest.approx(sorted(expected), abs=1e-4), side
    logged = read_jsonl(tmp_path / "out" / "metrics.jsonl")[0]  # the metrics read chosen over rejected
    assert logged["train/accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert logged["train/margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert logged["train/accuracy"] != 0.5  # so that reading the sides reversed shows
    model.config.pad_token_id = tok.pad_token_id
    ids = sum(chat_ids(tok, rows[0]["prompt"], rows[0]["chosen"]), [])
    with torch.no_grad():
        assert abs(model(torch.tensor([ids])).logits.item() - reward(model, ids)) > 1e-3  # armed


def test_reward_model_evaluation_reads_chosen_over_rejected():
    """Held-out accuracy and margin from the test's own rewards of each pair's two sides."""
    tok = AutoTokenizer.from_pretrained(TOY / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(TOY / "rm").eval()
    rows = read_jsonl(TOY / "data" / "prefs" / "test.jsonl")[:12]
    stop_ids = reward_model.stop_token_ids(tok, str(TOY / "rm"))
    pairs = reward_model.build_pairs(rows, tok, 1024, stop_ids, "test")
    metrics = reward_model.evaluate(model, pairs, 8, tok.pad_token_id, "cpu",
                                    torch.autocast("cpu", enabled=False))
    sides = [[reward(model, sum(chat_ids(tok, r["prompt"], r[side]), [])) for r in rows]
             for side in ("chosen", "rejected")]
    margins = torch.tensor(sides[0]) - torch.tensor(sides[1])
    assert metrics["eval/accuracy"] == pytest.approx((margins > 0).float().mean().item())
    assert metrics["eval/margin"] == pytest.approx(margins.mean().item(), abs=1e-4)
    assert 0.5 < metrics["eval/accuracy"] < 1  # better than chance, and not every pair: a swap shows


def test_sft_labels_the_response_tokens_and_nothing_else(tmp_path, monkeypatch):
    """The labelled tokens of every row fed to the loss are its assistant reply and the EOS: not the
    prompt, not the padding."""
    calls = record(monkeypatch, sft, "sft_loss_sum")
    sft.main(sft.Args(**{**TINY["sft"], "batch_size": 8, "max_train_samples": 8},
                      output_dir=str(tmp_path / "sft")))
    tok = AutoTokenizer.from_pretrained(TOY / "sft")
    rows = read_jsonl(TOY / "data" / "sft" / "train.jsonl")[:8]
    expected = sorted(tuple(chat_ids(tok, r["messages"][:-1], r["messages"][-1:])[1]) for r in rows)
    labels = calls[0][1]
    assert sorted(tuple(row[row != -100].tolist()) for row in labels) == expected


def test_var_scores_every_response_under_every_prompt_and_trains_each_group_on_its_weights(tmp_path,
                                                                                       monkeypatch):
    """rewards[i, j] = r(x_i, y_j) for the prompts and responses of each group, as the test's own
    reward-model forward scores them; --beta reaches var_weights; and each step's loss weighs every
    sequence by the weight of that very example (found by its log-prob under the policy, which a
    learning rate of 1e-9 keeps at toy/sft's). Four rows with four different prompts, both responses
    each: two groups of 4, one per step."""
    data = tmp_path / "pairs.jsonl"
    rows = distinct_prompt_rows(4)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    var_weights = var.var_weights  # the real one, for the test's own use
    weight_calls, loss_calls = record(monkeypatch, var, "var_weights"), record(monkeypatch, var, "var_loss")
    var.main(var.Args(**{**TINY["var"], "train_split": "train", "max_steps": 2}, dataset=str(data), beta=0.37,
                      learning_rate=1e-9, output_dir=str(tmp_path / "var")))
    tok = AutoTokenizer.from_pretrained(TOY / "sft")
    model = AutoModelForSequenceClassification.from_pretrained(TOY / "rm").eval()
    examples = [chat_ids(tok, r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")]
    every = torch.tensor([[reward(model, x + y) for _, y in examples] for x, _ in examples])
    assert len(weight_calls) == 2
    weight_of = {}
    for rewards, beta, *rest in weight_calls:
        assert beta == 0.37
        # which example each row of the group is: the one whose own reward is on the diagonal
        index = [int(((every.diagonal() - r).abs() < 1e-4).nonzero().squeeze()) for r in rewards.diagonal()]
        assert torch.allclose(rewards, every[index][:, index], atol=1e-4)
        weight_of.update(zip(index, var_weights(rewards, beta, *rest[:-1]).tolist()))
    policy = AutoModelForCausalLM.from_pretrained(TOY / "sft").eval()
    own_logps = torch.tensor([logp(policy, x, y) for x, y in examples])
    assert len(loss_calls) == 2
    for policy_logps, weights, _ in loss_calls:
        index = [int(((own_logps - x).abs() < 1e-3).nonzero().squeeze()) for x in policy_logps]
        assert weights.tolist() == pytest.approx([weight_of[a] for a in index], abs=1e-6)


def test_dpo_feeds_the_loss_the_policys_and_the_references_log_probs(tmp_path, monkeypatch):
    """With a reference that is not the starting policy (--ref toy/dpo), the first step's four
    log-probs are log pi_sft(y|x) and log pi_ref(y|x) of each pair's chosen and rejected responses,
    summed over the response and its EOS (the test's own forward): not the prompt's, not the other
    model's, not the other response's."""
    calls = record(monkeypatch, dpo, "dpo_loss")
    dpo.main(dpo.Args(**TINY["dpo"], ref=str(TOY / "dpo"), output_dir=str(tmp_path / "dpo")))
    tok = AutoTokenizer.from_pretrained(TOY / "sft")
    rows = read_jsonl(TOY / "data" / "prefs" / "train.jsonl")[:4]
    policy, ref = (AutoModelForCausalLM.from_pretrained(TOY / name).eval() for name in ("sft", "dpo"))
    which = [(policy, "chosen"), (policy, "rejected"), (ref, "chosen"), (ref, "rejected")]
    for (model, side), logps in zip(which, calls[0][:4]):
        expected = [logp(model, *chat_ids(tok, r["prompt"], r[side])) for r in rows]
        assert sorted(logps.tolist()) == pytest.approx(sorted(expected), abs=1e-4), side


@pytest.mark.parametrize("script", [sft, reward_model, dpo])
def test_a_steps_gradient_does_not_depend_on_how_the_step_is_split(script, tmp_path):
    """Seven rows in one micro-batch, or in micro-batches of 4 and 3 under gradient accumulation: the
    same rows and the same loss (a mean over the step's tokens or pairs), hence the same gradient. A
    loss divided by each micro-batch's own count, by the accumulation steps, or positions shifted by
    another padding, would differ. No clipping (it would hide a scale)."""
    whole, split = (step_gradients(script, tmp_path / str(b), batch_size=b, gradient_accumulation_steps=g,
                                   max_train_samples=7, max_grad_norm=1e9)[0] for b, g in ((7, 1), (4, 2)))
    assert (whole - split).norm() / whole.norm() < 1e-4


def test_a_ppo_steps_gradient_does_not_depend_on_how_the_step_is_split(tmp_path):
    """One optimiser step on 8 episodes in one forward-backward pass (b = 8, g = 1) or in two (b = 4,
    g = 2): the same rollouts, the advantages whitened over the same 8 episodes, one token mean over
    them (Table 9's b and g), hence the same gradient. Responses of up to 48 tokens, so the two passes
    hold different token counts and a mean of the passes' means would differ."""
    whole, split = (step_gradients(ppo, tmp_path / str(b), minibatch_size=b, gradient_accumulation_steps=g,
                                   max_new_tokens=48, max_grad_norm=1e9) for b, g in ((8, 1), (4, 2)))
    assert len(whole) == len(split) == 1
    assert (whole[0] - split[0]).norm() / whole[0].norm() < 1e-6


@pytest.mark.parametrize("script", [sft, reward_model, dpo, var, ppo])
def test_the_optimiser_steps_on_the_clipped_gradient(script, tmp_path):
    """With --max_grad_norm 1e-3, every gradient the optimiser receives has at most that norm, while the
    logged (pre-clipping) norm is far above it: the clip is applied, not just measured."""
    grads = step_gradients(script, tmp_path / "run", max_grad_norm=1e-3)
    logged = [r["train/grad_norm"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
              if "train/grad_norm" in r]
    assert grads and min(logged) > 1e-2  # armed
    assert max(g.norm().item() for g in grads) <= 1e-3 * (1 + 1e-4)


@pytest.fixture(scope="module")
def dpo_sft_rm():
    """toy/dpo, toy/sft and toy/rm, loaded as the scripts load them, in eval mode."""
    return [dpo.load_model(str(TOY / name), False, scalar=name == "rm").eval()
            for name in ("dpo", "sft", "rm")]


@pytest.mark.parametrize("script", [dpo, var, ppo, expo])
def test_evaluation_scores_each_sample_and_its_log_ratio_policy_over_reference(script, dpo_sft_rm, tmp_path):
    """The end-of-run evaluation of every script that samples, with a policy that is not its reference
    (toy/dpo over toy/sft) at T = 0.6 (PPO's --eval_temperature): each sample's score is the reward
    model's at its stop token and its log-ratio is log pi_T(y|x) - log pi_ref,T(y|x), as the test's own
    forwards give them. The two models swapped, or the reward read from the policy's side, would show."""
    tok = AutoTokenizer.from_pretrained(TOY / "sft")
    policy, ref, rm = dpo_sft_rm
    prompts = [r["prompt"] for r in read_jsonl(TOY / "data" / "prompts" / "test.jsonl")[:4]]
    field = "eval_temperature" if script is ppo else "temperature"
    args = script.Args(**{field: 0.6}, max_new_tokens=10, batch_size=2, seed=3)
    stop_ids, cpu = script.stop_token_ids(tok, str(TOY / "sft")), torch.autocast("cpu", enabled=False)
    evaluate = ppo.evaluate if script is ppo else script.evaluate_samples
    if script is expo:
        torch.manual_seed(args.seed)
        _, rows = evaluate(policy, ref, rm, tok, prompts, args, "cpu", cpu, stop_ids)
    else:
        evaluate(policy, ref, rm, tok, prompts, args, "cpu", cpu, stop_ids, tmp_path / "samples.jsonl")
        rows = read_jsonl(tmp_path / "samples.jsonl")
    assert [r["prompt"] for r in rows] == prompts
    for prompt, row in zip(prompts, rows):
        prompt_ids = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
        response_ids = tok(row["response"], add_special_tokens=False)["input_ids"]
        response_ids += [tok.eos_token_id] if row["finished"] else []
        assert len(response_ids) == row["length"]  # the text reads back as the sampled tokens
        expected = (token_logprobs(policy, prompt_ids, response_ids, 0.6).sum()
                    - token_logprobs(ref, prompt_ids, response_ids, 0.6).sum()).item()
        assert row["logratio"] == pytest.approx(expected, abs=1e-4)
        assert row["score"] == pytest.approx(reward(rm, prompt_ids + response_ids), abs=1e-4)
    assert sum(r["logratio"] for r in rows) > 0.5  # toy/dpo has moved away from toy/sft
