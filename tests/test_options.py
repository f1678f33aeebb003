"""Every option binds (issue 39): each trainer runs with its options off their defaults, and each option
is checked where it acts. A dry run on a dataset of known rows counts what the data options select; one
short run checks what the optimiser receives at every step (the learning rate of the schedule, Adam's
betas and epsilon, the weight decay), which steps log, evaluate and checkpoint, and the method's own
options where they land. `python tests/options.py` proves that ignoring any field of any script's Args
fails a test, here or elsewhere."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import dpo
import ppo
import reward_model
import sft
import var
from conftest import TOY, prompt_file
from test_tracking import StandIn


def rows_with_long_ones(path, n: int, long_at=(0, 3)) -> list:
    """The first n rows of a toy file, those at `long_at` given a user message 60 times longer (every
    trainer drops them at --max_length 128 or --max_prompt_length 64)."""
    rows = [json.loads(line) for line in open(path)][:n]
    for i in long_at:
        messages = rows[i].get("messages") or rows[i]["prompt"]
        messages[0] = {**messages[0], "content": " ".join([messages[0]["content"]] * 60)}
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Each format as a dataset folder: `train` (11 rows, the first and the fourth too long) and
    `validation` (5 rows)."""
    folders = {}
    for name in ("sft", "prefs", "prompts"):
        folders[name] = folder = tmp_path_factory.mktemp(name)
        held_out = [json.loads(line) for line in open(TOY / "data" / name / "test.jsonl")][:5]
        for split, rows in (("train", rows_with_long_ones(TOY / "data" / name / "train.jsonl", 11)),
                            ("validation", held_out)):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: str(folder) for name, folder in folders.items()}


# The data options off their defaults: rows 1-8 of train, one of them too long (7 left); 3 validation rows.
DATA = dict(train_split="train[1:]", eval_split="validation", max_length=128, max_train_samples=8,
            max_eval_samples=3, num_epochs=2, batch_size=2, gradient_accumulation_steps=2)


@pytest.mark.parametrize("script, dataset, changes, counts", [
    # 2 epochs of ceil(7 / 2) micro-batches, 2 per optimiser step: 4 steps
    (sft, "sft", DATA, {"train/examples": 7, "eval/examples": 3, "train/steps": 4}),
    (reward_model, "prefs", DATA, {"train/pairs": 7, "eval/pairs": 3, "train/steps": 4}),
    (dpo, "prefs", DATA, {"train/pairs": 7, "eval/pairs": 3, "train/steps": 4}),
    # rows 2-10, one too long: 8 chosen responses make 2 groups of 3; 3 epochs of 2, 2 per step: 3 steps
    (var, "prefs", dict(train_split="train[2:]", max_length=128, responses="chosen", batch_size=3,
                        num_epochs=3, gradient_accumulation_steps=2), {"train/groups": 2, "train/steps": 3}),
    # prompts 0-8, two too long: 7; 2 iterations of 4 prompts x 2 rollouts, each 2 steps of 2 x 2 episodes
    # (b x g), 2 epochs: 8 steps
    (ppo, "prompts", dict(train_split="train[:9]", eval_split="validation", num_eval_prompts=3,
                          max_prompt_length=64, total_episodes=16, batch_size=4, num_rollouts_per_prompt=2,
                          minibatch_size=2, gradient_accumulation_steps=2, ppo_epochs=2),
     {"train/prompts": 7, "eval/prompts": 3, "train/iterations": 2, "train/steps": 8,
      "train/episodes_per_batch": 8}),
], ids=["sft", "reward_model", "dpo", "var", "ppo"])
def test_a_dry_run_counts_what_the_data_options_select(script, dataset, changes, counts, data):
    field = "prompts" if script is ppo else "dataset"
    assert script.main(script.Args(**{field: data[dataset]}, **changes, dry_run=True)) == counts


def schedule(step: int, total: int, warmup: int, shape: str, floor: float = 0.0) -> float:
    """The test's own warmup-then-decay multiplier at the optimiser's step-th step (from 0)."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    decay = {"linear": 1 - progress, "cosine": (1 + math.cos(math.pi * progress)) / 2, "constant": 1}[shape]
    return floor + (1 - floor) * decay


# One short run each: 5 optimiser steps, warmup 0.4 (2 steps), logs every 2 steps, evaluations, samples and
# checkpoints every 4; wandb is tests/test_tracking.py's stand-in.
LOOP = dict(max_steps=5, max_train_samples=16, batch_size=2, learning_rate=3e-4, adam_betas=(0.8, 0.9),
            weight_decay=0.05, warmup_ratio=0.4, log_every=2, save_every=4, seed=5,
            gradient_checkpointing=True, report_to="wandb", run_name="every-option")
NAMES = ["sft", "reward_model", "dpo", "var", "ppo"]
WATCH = {"var": ("var_weights", "score")}  # functions whose calls a run records


def settings(name: str, rm: str, prompts: str) -> tuple:
    """(script, its Args off their defaults, the schedule's shape and floor) of a run; `rm` and `prompts`
    are a reward model and a prompt file other than the defaults (conftest's doubled_rm, prompt_file)."""
    samples = dict(reward_model=rm, eval_prompts=prompts, eval_prompts_split="train", num_eval_prompts=7,
                   max_prompt_length=20, max_new_tokens=6, temperature=0.8, sample_every=4)
    no_steps = {k: v for k, v in LOOP.items() if k not in ("max_steps", "max_train_samples")}
    return {
        "sft": (sft, dict(LOOP, model=str(TOY / "sft"), eval_every=4, lr_schedule="cosine",
                          max_eval_samples=4, num_samples=3, max_new_tokens=6, temperature=1e-4),
                "cosine", 0.0),
        "reward_model": (reward_model, dict(LOOP, eval_every=4, final_lr_ratio=0.3, max_eval_samples=4),
                         "linear", 0.3),
        # IPO at beta 0.2: steps 1 and 2 are at the reference (the first one's learning rate is 0)
        "dpo": (dpo, dict(LOOP, **samples, eval_every=4, max_eval_samples=4, loss_type="ipo", beta=0.2),
                "linear", 0.0),
        # toy/dpo trained against toy/sft
        "var": (var, dict(no_steps, **samples, max_steps=5, train_split="train[:16]", model=str(TOY / "dpo"),
                          ref=str(TOY / "sft"), beta=0.4, normalizer="ref", score_batch_size=3),
                "cosine", 0.0),
        # toy/dpo trained against toy/sft: 5 iterations of 2 episodes, one optimiser step each; the value
        # loss weighed 0 (the value model gets no gradient)
        "ppo": (ppo, dict(no_steps, total_episodes=10, minibatch_size=2, max_new_tokens=6, adam_eps=1e-6,
                          vf_coef=0.0, model=str(TOY / "dpo"), ref=str(TOY / "sft"), reward_model=rm,
                          value_model=str(TOY / "sft"), num_eval_prompts=4, eval_temperature=0.6), "constant",
                0.0),
    }[name]


def run(name: str, out, rm: str, prompts: str) -> dict:
    """A run of `settings`, with what the optimiser held at each step, the models it trained, the steps it
    checkpointed, the calls of WATCH's functions, what the tracker received, and the records (PPO's
    iterations as steps)."""
    script, changes, shape, floor = settings(name, rm, prompts)
    steps, models, saved, calls = [], [], [], {function: [] for function in WATCH.get(name, ())}

    def before_step(optimizer, args, kwargs):
        value_grads = [p.grad for p in models[-1].parameters()] if script is ppo else []
        steps.append(dict(optimizer.param_groups[0], value_grads=value_grads))

    def start_training(trained, *args, real=script.start_training, **kwargs):
        models.extend(trained)
        return real(trained, *args, **kwargs)

    def save_checkpoint(*args, real=script.save_checkpoint):
        saved.append(args[4])  # the step
        return real(*args)

    def watched(function):
        def recording(*args, real=getattr(script, function)):
            calls[function].append(args)
            return real(*args)
        return recording
    hook, tracker = register_optimizer_step_pre_hook(before_step), StandIn("wandb")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "wandb", tracker)
        patch.setattr(script, "start_training", start_training)
        patch.setattr(script, "save_checkpoint", save_checkpoint)
        for function in calls:
            patch.setattr(script, function, watched(function))
        try:
            script.main(script.Args(**changes, output_dir=str(out)))
        finally:
            hook.remove()
    records = [{"step": r.get("iteration"), **r} for r in map(json.loads, open(out / "metrics.jsonl"))]
    return dict(script=script, changes=changes, shape=shape, floor=floor, out=out, steps=steps, models=models,
                records=records, saved=saved, calls=calls, tracked=tracker.calls)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, doubled_rm):
    """runs(name): the run by that name, run once."""
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    kept, done = prompt_file(prompts), {}

    def get(name):
        if name not in done:
            done[name] = run(name, tmp_path_factory.mktemp(name) / "run", doubled_rm, str(prompts))
            done[name]["prompts"], done[name]["rm"] = kept, doubled_rm
        return done[name]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_the_optimiser_steps_with_the_options_schedule(name, runs):
    done = runs(name)
    changes, steps = done["changes"], done["steps"]
    assert len(steps) == 5
    warmup = int(changes["warmup_ratio"] * len(steps))
    for k, group in enumerate(steps):
        factor = schedule(k, len(steps), warmup, done["shape"], done["floor"])
        assert group["lr"] == pytest.approx(changes["learning_rate"] * factor, abs=1e-12), k
        assert group["betas"] == changes["adam_betas"] and group["weight_decay"] == changes["weight_decay"]
        assert group["eps"] == changes.get("adam_eps", 1e-8)
        assert all(g is None or not g.any() for g in group["value_grads"])  # PPO's --vf_coef 0
    assert all(m.is_gradient_checkpointing for m in done["models"])
    saved = json.loads((done["out"] / "config.json").read_text())
    assert saved.get("use_cache", True)  # checkpointing is for training: the saved model decodes with its cache


@pytest.mark.parametrize("name", NAMES)
def test_logs_evaluations_and_checkpoints_come_at_the_options_steps(name, runs):
    done = runs(name)
    records, changes = done["records"], done["changes"]
    assert [r["step"] for r in records if "train/lr" in r] == [2, 4, 5]
    if "eval_every" in changes:  # (and at the end, into metrics.jsonl or eval.json alone)
        assert [r["step"] for r in records if "eval/loss" in r and r["step"] < 5] == [4]
    assert done["saved"] == [4]  # none at the end: the final model is saved instead
    inits = [call[1] for call in done["tracked"] if call[0] == "init"]
    assert [init["name"] for init in inits] == ["every-option"]
    assert [call[1] for call in done["tracked"] if call[0] == "log"] == [r["step"] for r in records]


def sft_samples_follow_the_sampling_options(run):
    """3 samples of at most 6 tokens at T = 1e-4: the trained model's greedy continuations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run["out"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(run["out"]).eval()
    samples = [json.loads(line) for line in open(run["out"] / "samples.jsonl")]
    assert len(samples) == 3
    for sample in samples:
        ids = tok(tok.apply_chat_template(sample["prompt"], tokenize=False, add_generation_prompt=True),
                  return_tensors="pt", add_special_tokens=False)["input_ids"]
        greedy = model.generate(ids, do_sample=False, max_new_tokens=6, top_k=None, top_p=None,
                                temperature=None, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert sample["response"] == tok.decode(greedy, skip_special_tokens=True)


def samples_are_the_final_policys(run, prompts: list):
    """The end of run's samples of `prompts`, at the options' length and temperature, scored by the
    doubled reward model against the reference toy/sft: exactly what the script's evaluation gives for
    the saved policy, seeded by --seed (another seed, another temperature draw others), none longer
    than --max_new_tokens. That policy is nearer to the
    --model it was trained from (of toy/sft and toy/dpo) than to the other."""
    script, out, changes = run["script"], run["out"], run["changes"]
    policy, ref = (script.load_model(str(path), False).eval() for path in (out, TOY / "sft"))

    def distance(name):
        other = script.load_model(str(TOY / name), False)
        return sum(((p - q) ** 2).sum() for p, q in zip(policy.parameters(), other.parameters()))
    assert min(("sft", "dpo"), key=distance) == Path(changes.get("model", TOY / "sft")).name
    rm = script.load_model(run["rm"], False, scalar=True).eval()
    tok = script.load_tokenizer(str(out), False)
    evaluate = ppo.evaluate if script is ppo else script.evaluate_samples
    temperature = "eval_temperature" if script is ppo else "temperature"
    cpu = torch.autocast("cpu", enabled=False)

    def samples(**change):
        evaluate(policy, ref, rm, tok, prompts, script.Args(**{**changes, **change}), "cpu", cpu,
                 script.stop_token_ids(tok, str(out)), out / "again.jsonl")
        return [json.loads(line) for line in open(out / "again.jsonl")]
    rows, again = [json.loads(line) for line in open(out / "samples.jsonl")], samples()
    assert [r["prompt"] for r in rows] == prompts
    assert [r["response"] for r in rows] == [r["response"] for r in again]
    for key in ("score", "logratio"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in again], abs=1e-5)
    assert max(r["length"] for r in rows) == changes["max_new_tokens"]  # the toy's replies are longer
    for change in ({"seed": changes["seed"] + 1}, {temperature: changes[temperature] + 0.5}):
        assert [r["response"] for r in samples(**change)] != [r["response"] for r in rows], change


def sampled_every_4_steps(run):
    """Before training, every 4 steps and at the end (eval.json), the samples of the prompt file's 7
    prompts, one too long."""
    assert [r["step"] for r in run["records"] if "eval/score" in r] == [0, 4]
    samples_are_the_final_policys(run, run["prompts"])


def dpo_options_land(run):
    """IPO's loss at the reference is (1 / (2 beta))^2 (log 2 for DPO's): steps 1 and 2 are there."""
    first = next(r for r in run["records"] if "train/loss" in r)
    assert first["step"] == 2 and first["train/loss"] == pytest.approx((1 / (2 * 0.2)) ** 2, rel=1e-4)
    sampled_every_4_steps(run)


def var_options_land(run):
    """var_weights gets --beta and --normalizer ref with pi_ref's log-probs; each group of 2 is scored in
    calls of --score_batch_size 3 (its 4 prompt-response pairs: 3, then 1)."""
    assert {(beta, normalizer) for _, beta, normalizer, _ in run["calls"]["var_weights"]} == {(0.4, "ref")}
    assert all(torch.isfinite(ref_logps).all() for *_, ref_logps in run["calls"]["var_weights"])
    assert [input_ids.shape[0] for _, input_ids, _ in run["calls"]["score"][:2]] == [3, 1]
    sampled_every_4_steps(run)


def ppo_options_land(run):
    """The value model is --value_model's backbone (toy/sft, under a new head), not the reward model's,
    and (weighed 0) stays nearest to it; the end's samples are the test prompts' first 4 at
    --eval_temperature."""
    value = run["models"][-1].model
    sft_backbone = ppo.load_model(str(TOY / "sft"), False).model
    rm_backbone = ppo.load_model(run["rm"], False, scalar=True).model

    def distance(backbone):
        return sum(((p - q) ** 2).sum() for p, q in zip(value.parameters(), backbone.parameters()))
    assert distance(sft_backbone) < distance(rm_backbone) / 100
    prompts = [json.loads(line)["prompt"] for line in open(TOY / "data" / "prompts" / "test.jsonl")][:4]
    samples_are_the_final_policys(run, prompts)


METHOD_CHECKS = {"sft": sft_samples_follow_the_sampling_options, "dpo": dpo_options_land,
                 "var": var_options_land, "ppo": ppo_options_land}


@pytest.mark.parametrize("name", list(METHOD_CHECKS))
def test_the_methods_own_options_land(name, runs):
    METHOD_CHECKS[name](runs(name))


TINY = {  # one optimiser step on a few toy rows
    "sft": dict(max_steps=1, batch_size=2, max_train_samples=8, eval_split=None, num_samples=0),
    "reward_model": dict(max_steps=1, batch_size=2, max_train_samples=8, eval_split=None),
    "dpo": dict(max_steps=1, batch_size=2, max_train_samples=8, eval_split=None, reward_model="none"),
    "var": dict(max_steps=1, batch_size=2, train_split="train[:8]", eval_prompts="none"),
    "ppo": dict(total_episodes=2, batch_size=2, minibatch_size=2, max_new_tokens=4, eval_split=None),
}


@pytest.mark.parametrize("name", NAMES)
def test_the_seed_draws_the_run(name, tmp_path):
    """Seeds 1 and 2 log different first steps: the rows drawn (and the reward model's new head, PPO's
    rollouts). A seed read nowhere would give both the default's."""
    script = dict(sft=sft, reward_model=reward_model, dpo=dpo, var=var, ppo=ppo)[name]
    first = []
    for seed in (1, 2):
        script.main(script.Args(**TINY[name], seed=seed, log_every=1, output_dir=str(tmp_path / str(seed))))
        record = json.loads(open(tmp_path / str(seed) / "metrics.jsonl").readline())
        first.append({k: v for k, v in record.items() if not k.startswith("perf/")})
    assert first[0] != first[1]
