"""The real-like tier (tests/real_like.py): what a real chat checkpoint does differently from the toy.

Each test's docstring names the trap it guards against. Every test also checks that its trap is armed
on the tier (the wrong reading gives a different number), so a pass means the scripts avoid it."""

import json

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import dera
import dpo
import expo
import ppo
import reward_model
import sft
import var
from conftest import toy_prompts
from real_like import BOS, EOS, SECOND_STOP

CPU, NO_AUTOCAST = torch.device("cpu"), torch.autocast("cpu", enabled=False)
PADS = ["eos", "separate"]
PROMPT = [{"role": "user", "content": "Write a review of the pizza."}]
LONG_PROMPT = [{"role": "user", "content": "Write a review of the new album by the band from the city."}]
RESPONSE = [{"role": "assistant", "content": "The pizza was great, and I loved it."}]
SHORT = [{"role": "assistant", "content": "It was bad."}]


@pytest.mark.parametrize("pad", PADS)
def test_one_scoring_position_in_training_ppo_and_evaluation(tier, pad):
    """Trap: with text after <|im_end|> and pad == eos, each consumer read the reward at another token."""
    paths = tier[pad]
    tok = reward_model.load_tokenizer(paths["rm"], False)
    stops = reward_model.stop_token_ids(tok, paths["rm"])
    rows = [{"prompt": PROMPT, "chosen": RESPONSE, "rejected": SHORT},
            {"prompt": LONG_PROMPT, "chosen": SHORT, "rejected": RESPONSE}]
    pairs = reward_model.build_pairs(rows, tok, 1024, stops)
    seq = pairs[0]["chosen"]
    assert seq[-1] == EOS and seq[0] == BOS and seq.count(BOS) == 1  # nothing after the end of turn
    rm = reward_model.load_reward_model(paths["rm"], tok.pad_token_id, False).eval()
    with torch.no_grad():
        trained = reward_model.score(rm, **reward_model.collate_pairs(pairs, tok.pad_token_id))[0]

        # PPO: the query left-padded in a batch with a longer prompt, the response right-padded
        prompt_ids = tok(ppo.format_prompt(tok, PROMPT), add_special_tokens=False)["input_ids"]
        long_ids = tok(ppo.format_prompt(tok, LONG_PROMPT), add_special_tokens=False)["input_ids"]
        response = seq[len(prompt_ids):]
        Q, R = len(long_ids), len(response) + 3
        mb = {"query": torch.full((2, Q), tok.pad_token_id), "response": torch.full((2, R), tok.pad_token_id),
              "query_mask": torch.zeros(2, Q, dtype=torch.long), "mask": torch.zeros(2, R, dtype=torch.long)}
        for i, (q, r) in enumerate([(prompt_ids, response), (long_ids, response[:2])]):
            mb["query"][i, Q - len(q):], mb["query_mask"][i, Q - len(q):] = torch.tensor(q), 1
            mb["response"][i, : len(r)], mb["mask"][i, : len(r)] = torch.tensor(r), 1
        ppo_rm = ppo.load_model(paths["rm"], False, scalar=True).eval()
        _, ppo_scores = ppo.values_and_scores(ppo_rm, mb, NO_AUTOCAST)

        # evaluation: each script's scorer on (prompt_ids, response_ids, finished) samples (ppo.py
        # evaluates with values_and_scores, above)
        samples = [(prompt_ids, response, True), (long_ids, response[:2], False)]
        evaluated = {}
        for script in (dpo, var, expo):
            batch = script.collate_sequences(samples, tok.pad_token_id)
            evaluated[script.__name__] = script.score(rm, batch["input_ids"], batch["attention_mask"])[0]
        evaluated["dera"] = torch.tensor(dera.score_samples(rm, samples, tok.pad_token_id, 2, CPU)[0])
    assert ppo_scores[0].item() == pytest.approx(trained.item(), abs=1e-4)
    for name, s in evaluated.items():
        assert s.item() == pytest.approx(trained.item(), abs=1e-4), name
    if pad == "eos":  # armed: transformers' own pooling skips the EOS when pad == eos
        with torch.no_grad():
            pooled = rm(input_ids=torch.tensor([seq])).logits[0, 0]
        assert abs(pooled - trained) > 1e-2


@pytest.mark.parametrize("script", [sft, reward_model, dpo, var])
def test_no_doubled_bos_and_the_prefix_check_holds(tier, script, capsys):
    """Trap: a tokenizer that adds BOS by itself under a template that writes it too."""
    path = tier["eos"]["sft"]
    tok = script.load_tokenizer(path, False)
    assert tok("x")["input_ids"][0] == BOS  # armed: the tokenizer adds BOS on its own
    prompt_ids, completion_ids = script.tokenize_example(tok, PROMPT, RESPONSE, 1024,
                                                         script.stop_token_ids(tok, path))
    assert prompt_ids[0] == BOS and (prompt_ids + completion_ids).count(BOS) == 1
    assert completion_ids[-1] == EOS and completion_ids.count(EOS) == 1
    assert "warning" not in capsys.readouterr().out


def test_sampling_is_exactly_softmax_of_logits_over_temperature(tier):
    """Trap: generate() inherits the checkpoint's temperature, top-k, top-p and repetition penalty."""
    path = tier["eos"]["sft"]
    tok = ppo.load_tokenizer(path, False)
    stops = ppo.stop_token_ids(tok, path)
    model = ppo.load_model(path, False).eval()
    tok.padding_side = "left"

    # 1. every sampled token's log-prob, as the sampler had it, equals a forward pass at logits / T
    prompts = toy_prompts("validation")[:16]
    batch = tok([ppo.format_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True,
                add_special_tokens=False)

    torch.manual_seed(0)
    scored = {**batch, "output_scores": True, "return_dict_in_generate": True}  # the sampler's own scores
    out = ppo.generate(model, scored, 0.7, 24, tok.pad_token_id, stops)
    Q = batch["input_ids"].shape[1]
    response = out.sequences[:, Q:]
    is_stop = torch.isin(response, torch.tensor(stops))
    mask = ((is_stop.cumsum(1) - is_stop.long()) == 0).long()
    sampler = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
    mb = {"query": batch["input_ids"], "query_mask": batch["attention_mask"], "response": response,
          "mask": mask}
    with torch.no_grad():
        recomputed, _ = ppo.policy_logprobs(model, mb, 0.7, NO_AUTOCAST)
    assert ((sampler - recomputed).abs() * mask).max() < 1e-4

    # 2. the empirical next-token distribution of many samples matches softmax(logits / T)
    N = 1000
    text = ppo.format_prompt(tok, PROMPT) + "The pizza was great, and"
    one = tok([text] * N, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(1)
    tokens = dpo.generate(model, one, 1.0, 1, tok.pad_token_id, stops)[:, -1]
    with torch.no_grad():
        logits = model(input_ids=one["input_ids"][:1]).logits[:, -1].float()
    target = logits.softmax(-1)[0]
    empirical = torch.bincount(tokens, minlength=target.shape[0]).float() / N
    tv = 0.5 * (empirical - target).abs().sum().item()
    assert tv < 0.05, tv
    # armed: the checkpoint's repetition penalty of 1.3 alone would put the sampler this far off
    penalised = RepetitionPenaltyLogitsProcessor(1.3)(one["input_ids"][:1], logits.clone()).softmax(-1)[0]
    assert 0.5 * (penalised - target).abs().sum().item() > 0.2


@pytest.mark.parametrize("pad", PADS)
def test_every_stop_id_ends_a_response(tier, pad):
    """Trap: a response that stops on the generation config's second stop id counted as unfinished,
    and the padding after it entered PPO's mask, length and KL."""
    path = tier[pad]["sft"]
    tok = ppo.load_tokenizer(path, False)
    stops = ppo.stop_token_ids(tok, path)
    assert stops == [EOS, SECOND_STOP]
    policy = ppo.load_model(path, False).eval()
    prompts = toy_prompts("validation")[:32]
    torch.manual_seed(0)
    batch = ppo.rollout(policy, tok, prompts, ppo.Args(max_new_tokens=48, temperature=1.0), CPU, stops)
    assert (batch["query"][batch["query_mask"].bool()] == BOS).sum() == len(prompts)  # one BOS each
    ends = []
    for response, mask, finished in zip(batch["response"], batch["mask"], batch["finished"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # one contiguous run from the first token
        stop_at = [t for t, x in enumerate(response[:n].tolist()) if x in stops]
        assert bool(finished) == bool(stop_at) and (not stop_at or stop_at == [n - 1])
        assert (response[n:] == tok.pad_token_id).all()
        ends.append(response[n - 1].item())
    assert ends.count(SECOND_STOP) >= 4 and ends.count(EOS) >= 4  # armed: both stop ids occur
    assert batch["finished"].float().mean() > 0.9
    rewards = ppo.kl_penalized_rewards(torch.ones(len(prompts)), torch.zeros_like(batch["mask"].float()),
                                       torch.zeros_like(batch["mask"].float()), batch["mask"].float(), 0.05)
    assert (rewards.argmax(1) == batch["mask"].sum(1) - 1).all()  # the score sits on the stop token

    torch.manual_seed(0)
    dera_args = dera.Args(max_new_tokens=48)
    for samples in (dpo.sample_responses(policy, tok, prompts, 48, 1.0, 16, CPU, stops),
                    dera.decode_all(policy, [], [], prompts, tok, dera_args, CPU, stops)[0]):
        for prompt_ids, response, finished in samples:
            assert prompt_ids.count(BOS) == 1
            stop_at = [t for t, x in enumerate(response) if x in stops]
            assert finished == bool(stop_at) and (not stop_at or stop_at == [len(response) - 1])
        assert sum(r[-1] == SECOND_STOP for _, r, _ in samples) >= 4


def test_dpo_trains_without_dropout_and_evaluates_with_the_tier_reward_model(tier, tmp_path):
    """Trap: dropout in the config makes DPO's first implicit rewards nonzero (the policy in train
    mode is not the reference), and a reward model without pad_token_id crashed the evaluation."""
    paths = tier["eos"]
    common = dict(model=paths["sft"], max_train_samples=16, batch_size=8, max_steps=1, log_every=1,
                  eval_split=None, reward_model=paths["rm"], num_eval_prompts=8, max_new_tokens=24)
    dpo.main(dpo.Args(**common, output_dir=str(tmp_path / "off")))
    first = json.loads(open(tmp_path / "off" / "metrics.jsonl").readline())
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5, first
    results = json.load(open(tmp_path / "off" / "eval.json"))
    assert results["eval/eos_rate"] > 0.5 and "eval/score" in results
    dpo.main(dpo.Args(**{**common, "reward_model": "none"}, dropout=True, output_dir=str(tmp_path / "on")))
    kept = json.loads(open(tmp_path / "on" / "metrics.jsonl").readline())
    assert abs(kept["rewards/chosen"]) + abs(kept["rewards/rejected"]) > 1e-3  # armed


def test_ppo_first_minibatch_is_on_policy_on_the_tier(tier, tmp_path):
    """Trap: old log-probs and values taken in train mode with dropout (approx_kl > 0 before any
    update), and responses ending on the second stop id penalised as unfinished."""
    paths = tier["eos"]
    ppo.main(ppo.Args(model=paths["sft"], reward_model=paths["rm"], total_episodes=16, batch_size=16,
                      minibatch_size=16, max_new_tokens=32, log_every=1, eval_split=None,
                      output_dir=str(tmp_path / "ppo")))
    first = json.loads(open(tmp_path / "ppo" / "metrics.jsonl").readline())
    assert first["ppo/approx_kl"] < 1e-9 and first["ppo/clipfrac"] == 0, first
    assert first["val/eos_rate"] > 0.9 and first["objective/score"] > ppo.Args().missing_eos_penalty / 2


@pytest.mark.parametrize("script", [dpo, var, ppo])
def test_disable_dropout_reaches_the_attention_rate(tier, script):
    """Trap: Llama's and Qwen2's attention keep their dropout rate as a float, out of nn.Dropout's reach."""
    model = script.load_model(tier["eos"]["sft"], False).train()
    ids = torch.tensor([[BOS, 4, 407, 270, 19, EOS]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, model(ids).logits)  # armed: dropout in train mode
        script.disable_dropout(model)
        train_mode = model(ids).logits
        assert torch.equal(train_mode, model(ids).logits)
        assert torch.allclose(train_mode, model.eval()(ids).logits, atol=1e-6)


@pytest.mark.parametrize("script", [var, ppo])
def test_main_trains_without_dropout_unless_asked(tier, script, tmp_path, monkeypatch):
    """The models main hands the optimiser have their attention dropout off, or under --dropout the
    tier's own rate (0.1): the run is stopped there, before any training."""
    class Started(Exception):
        pass

    def start_training(models, *args, **kwargs):
        rates[dropout] = {m.attention_dropout for model in models for m in model.modules()
                          if isinstance(getattr(m, "attention_dropout", None), float)}
        raise Started
    monkeypatch.setattr(script, "start_training", start_training)
    paths, rates = tier["eos"], {}
    small = (dict(train_split="train[:4]", batch_size=2, eval_prompts="none") if script is var else
             dict(total_episodes=2, batch_size=2, minibatch_size=2, eval_split=None))
    for dropout in (False, True):
        with pytest.raises(Started):
            script.main(script.Args(model=paths["sft"], reward_model=paths["rm"], **small, dropout=dropout,
                                    output_dir=str(tmp_path / str(dropout))))
    assert rates[False] == {0.0} and rates[True] == {0.1}
