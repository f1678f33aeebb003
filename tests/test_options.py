"""Every option binds (issue 39): each trainer runs with its options off their defaults, and each option
is checked where it acts. A dry run on a dataset of known rows counts what the data options select; one
short run checks what the optimiser receives at every step (the learning rate of the schedule, Adam's
betas and epsilon, the weight decay), which steps log, evaluate and checkpoint, and the method's own
options where they land. `python tests/options.py` proves that ignoring any field of any script's Args
fails a test, here or elsewhere."""

import json
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import dpo
import ppo
import reward_model
import sft
import var
from conftest import TOY


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
        for split, rows in (("train", rows_with_long_ones(TOY / "data" / name / "train.jsonl", 11)),
                            ("validation", [json.loads(line) for line in open(TOY / "data" / name / "test.jsonl")][:5])):
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
    (var, "prefs", dict(train_split="train[2:]", max_length=128, responses="chosen", batch_size=3, num_epochs=3,
                        gradient_accumulation_steps=2), {"train/groups": 2, "train/steps": 3}),
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


# One short run each: 5 optimiser steps, warmup 0.4 (2 steps), logs, evaluations and checkpoints every 2.
LOOP = dict(max_steps=5, max_train_samples=16, batch_size=2, learning_rate=3e-4, adam_betas=(0.8, 0.9), weight_decay=0.05,
            warmup_ratio=0.4, log_every=2, save_every=2, seed=5, gradient_checkpointing=True)
RUNS = {
    "sft": (sft, dict(LOOP, model=str(TOY / "sft"), eval_every=2, lr_schedule="cosine", max_eval_samples=4,
                      num_samples=3, max_new_tokens=6, temperature=1e-4), "cosine", 0.0),
    "reward_model": (reward_model, dict(LOOP, eval_every=2, final_lr_ratio=0.3, max_eval_samples=4), "linear",
                     0.3),
    "dpo": (dpo, dict(LOOP, eval_every=2, max_eval_samples=4, reward_model="none"), "linear", 0.0),
    "var": (var, dict({k: v for k, v in LOOP.items() if k != "max_train_samples"}, train_split="train[:16]",
                      eval_prompts="none"), "cosine", 0.0),
    # 5 iterations of 2 episodes, one optimiser step each; the value loss weighed 0 (the value model
    # gets no gradient)
    "ppo": (ppo, dict({k: v for k, v in LOOP.items() if k not in ("max_steps", "max_train_samples")},
                      total_episodes=10, minibatch_size=2, max_new_tokens=6, adam_eps=1e-6, vf_coef=0.0,
                      eval_split=None), "constant", 0.0),
}


@pytest.fixture(scope="module", params=list(RUNS))
def loop_run(request, tmp_path_factory):
    """A run of RUNS, with what the optimiser held at each step and the models it trained."""
    script, changes, shape, floor = RUNS[request.param]
    out = tmp_path_factory.mktemp(request.param) / "run"
    steps, models, saved = [], [], []

    def before_step(optimizer, args, kwargs):
        value_grads = [p.grad for p in models[-1].parameters()] if script is ppo else []
        steps.append(dict(optimizer.param_groups[0], value_grads=value_grads))
    real_start, real_save = script.start_training, script.save_checkpoint

    def start_training(trained, *args, **kwargs):
        models.extend(trained)
        return real_start(trained, *args, **kwargs)

    def save_checkpoint(models, optimizer, scheduler, out, step, progress):
        saved.append(step)
        return real_save(models, optimizer, scheduler, out, step, progress)
    hook = register_optimizer_step_pre_hook(before_step)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(script, "start_training", start_training)
        patch.setattr(script, "save_checkpoint", save_checkpoint)
        try:
            script.main(script.Args(**changes, output_dir=str(out)))
        finally:
            hook.remove()
    records = [{"step": r.get("step", r.get("iteration")), **r} for r in map(json.loads, open(out / "metrics.jsonl"))]
    return dict(name=request.param, script=script, changes=changes, shape=shape, floor=floor, out=out, steps=steps, models=models,
                records=records, saved=saved)


def test_the_optimiser_steps_with_the_options_schedule(loop_run):
    changes, steps = loop_run["changes"], loop_run["steps"]
    assert len(steps) == 5
    warmup = int(changes["warmup_ratio"] * len(steps))
    for k, group in enumerate(steps):
        expected = changes["learning_rate"] * schedule(k, len(steps), warmup, loop_run["shape"], loop_run["floor"])
        assert group["lr"] == pytest.approx(expected, abs=1e-12), k
        assert group["betas"] == changes["adam_betas"] and group["weight_decay"] == changes["weight_decay"]
        assert group["eps"] == changes.get("adam_eps", 1e-8)
        assert all(g is None or not g.any() for g in group["value_grads"])  # PPO's --vf_coef 0
    assert all(m.is_gradient_checkpointing for m in loop_run["models"])


def test_logs_evaluations_and_checkpoints_come_at_the_options_steps(loop_run):
    records, changes = loop_run["records"], loop_run["changes"]
    assert [r["step"] for r in records if "train/lr" in r] == [2, 4, 5]
    if "eval_every" in changes:  # (and at the end, into metrics.jsonl or eval.json alone)
        assert [r["step"] for r in records if "eval/loss" in r and r["step"] < 5] == [2, 4]
    assert loop_run["saved"] == [2, 4]  # none at the end: the final model is saved instead


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


METHOD_CHECKS = {"sft": sft_samples_follow_the_sampling_options}


def test_the_methods_own_options_land(loop_run):
    METHOD_CHECKS.get(loop_run["name"], lambda run: None)(loop_run)
