"""--report_to: the records of metrics.jsonl, at their steps, in the tracker a user watches; eval.json as
the run's summary; --resume continuing the same run. TensorBoard for real (its own reader reads the event
files back; installed from tests/requirements-trackers.txt); wandb and trackio through stand-in modules
that record the calls (their offline formats cannot be read back here)."""

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

import dpo
import ppo
import sft

TINY_SFT = dict(eval_split=None, max_train_samples=32, batch_size=4, num_samples=0, log_every=1)



def records(out: Path) -> list:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def scalars(out: Path) -> dict:
    """tag -> [(step, value)], read back by TensorBoard's own reader (the last write of a step wins, as
    TensorBoard shows it after a resume's purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    return {tag: sorted({e.step: e.value for e in events.Scalars(tag)}.items())
            for tag in events.Tags()["scalars"]}


def expected(out: Path, step_key: str = "step") -> dict:
    found = {}
    for r in records(out):
        for k, v in r.items():
            if k != step_key:
                found.setdefault(k, []).append((r[step_key], v))
    return found


def test_tensorboard_receives_every_record_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = dict(**TINY_SFT | {"eval_split": "test", "max_eval_samples": 4}, eval_every=2, max_steps=4,
                save_every=2, report_to="tensorboard", output_dir=str(out))
    real, calls = sft.optimizer_step, []

    def stop_at_step_4(*a, **kw):  # Ctrl-C during step 4: the resumed run redoes steps 3 and 4
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(sft, "optimizer_step", stop_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            sft.main(sft.Args(**args))
    sft.main(sft.Args(**args, resume=True))
    got, want = scalars(out), expected(out)
    assert set(got) == set(want) and "train/loss" in got and "eval/loss" in got
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6), tag


class StandIn(types.ModuleType):
    """wandb or trackio as far as the scripts use them: init, log, finish (and wandb's summary and ids)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec sees it
        self.calls = []
        self.run = types.SimpleNamespace(summary={})
        self.util = types.SimpleNamespace(generate_id=lambda: "run-id-1")

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))

    def log(self, record, step=None):  # wandb's step is a logged value ("step"): resumed runs relog
        record = dict(record)
        self.calls.append(("log", step if step is not None else record.pop("step"), record))

    def define_metric(self, name, **kwargs):
        self.calls.append(("define_metric", name, kwargs))

    def finish(self):
        self.calls.append(("finish",))


@pytest.mark.parametrize("kind", ["wandb", "trackio"])
def test_wandb_and_trackio_receive_the_records_the_config_and_the_summary(kind, tmp_path, monkeypatch):
    module = StandIn(kind)
    monkeypatch.setitem(sys.modules, kind, module)
    out = tmp_path / "run"
    results = sft.main(sft.Args(**TINY_SFT, max_steps=3, report_to=kind, output_dir=str(out)))
    (_, init), *logs, finish = [c for c in module.calls if c[0] != "define_metric"]
    assert init["project"] == "minialign" and init["name"] == "run" and init["resume"] == "never"
    assert init["config"]["learning_rate"] == sft.Args().learning_rate and init["config"]["max_steps"] == 3
    assert ("id" in init) == (kind == "wandb")
    assert [(step, record) for _, step, record in logs] == [(r.pop("step"), r) for r in records(out)]
    assert finish == ("finish",)
    assert module.run.summary == (results if kind == "wandb" else {})


def test_a_resumed_wandb_run_continues_the_stored_run_under_a_new_name(tmp_path, monkeypatch):
    module = StandIn("wandb")
    monkeypatch.setitem(sys.modules, "wandb", module)
    out = tmp_path / "run"
    args = dict(**TINY_SFT, max_steps=4, save_every=2, report_to="wandb", output_dir=str(out))
    with monkeypatch.context() as m:
        m.setattr(sft, "finish", lambda *_: sys.exit("stopped"))  # killed after the final save
        with pytest.raises(SystemExit):
            sft.main(sft.Args(**args))
    module.util.generate_id = lambda: "a-new-id"
    sft.main(sft.Args(**{**args, "run_name": "renamed"}, resume=True))  # --run_name may change on resume
    inits = [c[1] for c in module.calls if c[0] == "init"]
    assert [i["id"] for i in inits] == ["run-id-1", "run-id-1"] and inits[1]["name"] == "renamed"
    assert [i["resume"] for i in inits] == ["never", "allow"]
    assert ("define_metric", "*", {"step_metric": "step", "step_sync": True}) in module.calls
    steps = [c[1] for c in module.calls if c[0] == "log"]
    assert steps == [1, 2, 3, 4, 3, 4]  # the resumed run logs again what followed its checkpoint


def test_ppo_logs_at_its_iterations(tmp_path, monkeypatch):
    module = StandIn("trackio")
    monkeypatch.setitem(sys.modules, "trackio", module)
    out = tmp_path / "run"
    ppo.main(ppo.Args(total_episodes=8, batch_size=4, minibatch_size=4, max_new_tokens=4, eval_split=None,
                      log_every=1, report_to="trackio", output_dir=str(out)))
    logs = [c for c in module.calls if c[0] == "log"]
    assert [step for _, step, _ in logs] == [r["iteration"] for r in records(out)] == [1, 2]
    assert "iteration" not in logs[0][2] and "ppo/policy_loss" in logs[0][2]


@pytest.mark.parametrize("script", [sft, dpo, ppo])
def test_a_tracker_that_is_not_installed_is_refused_before_anything_loads(script, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="pip install wandb"):
        script.main(script.Args(report_to="wandb", output_dir=str(out)))
    assert not out.exists()
