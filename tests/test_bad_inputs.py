"""Bad input, interruptions and first contact: every case fails before any work with one clear line,
leaves the output dir and the models it was given unchanged, and a stopped run resumes where it was.
Each case calls a script in-process, with tiny settings."""

import hashlib
import json
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import dera
import dpo
import expo
import ppo
import reward_model
import sft
import var
from conftest import TOY

MODELS = ["sft", "rm", "dpo"]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module", autouse=True)
def toy_models_unchanged():
    """No case may touch a model it was given: the toy's checkpoints hash the same before and after."""
    before = {m: digest(TOY / m) for m in MODELS}
    yield
    assert {m: digest(TOY / m) for m in MODELS} == before


def fails(call, match: str) -> str:
    """Runs `call`, which must exit with a one-line message matching `match`."""
    with pytest.raises(SystemExit) as e:
        call()
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    assert match.lower() in message.lower(), message
    return message


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@contextmanager
def deadline(seconds: int):
    """Fails a case that would hang instead of erroring."""
    def timeout(*_):
        raise TimeoutError(f"still running after {seconds}s: a hang")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


TINY_DPO = dict(reward_model="none", eval_split=None, max_train_samples=32, batch_size=4, log_every=1)


# --- arguments: refused before anything loads ------------------------------------------------------------
ARGUMENT_CASES = [
    (dpo, dict(beta=0.0), "--beta must be positive"),
    (dpo, dict(beta=-0.1), "--beta must be positive"),
    (dpo, dict(beta=0.0, loss_type="ipo"), "--beta must be positive"),
    (var, dict(beta=0.0), "--beta must be positive"),
    (var, dict(beta=-1.0), "--beta must be positive"),
    (ppo, dict(beta=-0.05), "--beta"),
    (ppo, dict(max_prompt_length=0), "--max_prompt_length must be at least 1"),
    (dera, dict(max_prompt_length=0), "--max_prompt_length must be at least 1"),
    (dpo, dict(label_smoothing=2.0), "[0, 0.5)"),
    (dpo, dict(label_smoothing=0.1, loss_type="ipo"), "sigmoid loss only"),
    (sft, dict(temperature=0.0), "--temperature must be positive"),
    (dpo, dict(temperature=0.0), "--temperature must be positive"),
    (var, dict(temperature=0.0), "--temperature must be positive"),
    (ppo, dict(temperature=0.0), "--temperature must be positive"),
    (dera, dict(temperature=0.0), "--temperature must be positive"),
    (expo, dict(temperature=0.0), "--temperature must be positive"),
    (sft, dict(num_epochs=0), "--num_epochs must be at least 1"),
    (reward_model, dict(max_steps=-3), "--max_steps must be at least 1"),
    (dpo, dict(max_steps=-3), "--max_steps must be at least 1"),
    (var, dict(num_epochs=0), "--num_epochs must be at least 1"),
]


@pytest.mark.parametrize("script,changes,match", ARGUMENT_CASES,
                         ids=[f"{s.__name__}-{'-'.join(f'{k}={v}' for k, v in c.items())}"
                              for s, c, _ in ARGUMENT_CASES])
def test_bad_argument_is_refused_before_anything_loads(script, changes, match, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were checked")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_loading)
    out = tmp_path / "run"
    changes = {"output_dir": str(out), **changes}
    fails(lambda: script.main(script.Args(**changes)), match)
    assert not out.exists()


def test_resume_needs_the_output_dir_of_the_run():
    for script in (sft, reward_model, dpo, var, ppo):
        fails(lambda: script.main(script.Args(resume=True)), "--resume needs the --output_dir")


def test_ppo_beta_zero_is_valid():
    ppo.check_args(ppo.Args(beta=0.0))  # no KL penalty: a choice, not a mistake


def test_gradient_accumulation_larger_than_the_data(tmp_path):
    out = tmp_path / "run"
    fails(lambda: sft.main(sft.Args(max_train_samples=4, batch_size=4, gradient_accumulation_steps=8,
                                    eval_split=None, output_dir=str(out))),
          "fewer than one optimiser step")
    assert not out.exists()


def test_ppo_with_fewer_prompts_than_a_batch_errors_instead_of_hanging(tmp_path):
    prompts = write_jsonl(tmp_path / "three.jsonl", [{"prompt": f"p{i}"} for i in range(3)])
    out = tmp_path / "run"
    with deadline(60):
        fails(lambda: ppo.main(ppo.Args(prompts=prompts, eval_split=None, batch_size=8, minibatch_size=8,
                                        total_episodes=8, output_dir=str(out))), "3")
    assert not out.exists()


# --- data ------------------------------------------------------------------------------------------------
def pref_rows(n: int) -> list:
    return [{"prompt": [{"role": "user", "content": f"How was the jacket {i}?"}],
             "chosen": [{"role": "assistant", "content": "It was great."}],
             "rejected": [{"role": "assistant", "content": "It was bad."}]} for i in range(n)]


def test_one_file_is_split_by_slicing_its_one_split(tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", pref_rows(40))
    result = dpo.main(dpo.Args(dataset=data, train_split="train[:90%]", eval_split="train[90%:]", dry_run=True,
                               reward_model="none"))
    assert (result["train/pairs"], result["eval/pairs"]) == (36, 4)
    train, evals = (dpo.load_split(data, split, [("chosen", "rejected")]) for split in ("train[:90%]", "train[90%:]"))
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in evals}


def test_prompts_that_fill_max_length_are_dropped_and_counted(tmp_path, capsys):
    rows = pref_rows(6)
    for r in rows[:2]:
        r["prompt"][0]["content"] = "How was the jacket? " * 30
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    result = dpo.main(dpo.Args(dataset=data, eval_split=None, max_length=40, dry_run=True, reward_model="none",
                               batch_size=2))
    assert result["train/pairs"] == 4
    assert "dropped 2 of 6 rows" in capsys.readouterr().out
    fails(lambda: dpo.main(dpo.Args(dataset=data, eval_split=None, max_length=5, dry_run=True,
                                    reward_model="none")), "every prompt fills --max_length")
    fails(lambda: sft.main(sft.Args(dataset=write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "x " * 50, "completion": "y"}]), eval_split=None, max_length=8, dry_run=True)),
          "every prompt fills --max_length")


def test_prompts_longer_than_max_prompt_length_are_dropped_and_counted(tmp_path, capsys):
    """Table 9's L_p wherever prompts are sampled from: a longer prompt is dropped at load and counted,
    and a set with none left fails before any model loads."""
    rows = [{"prompt": r["prompt"]} for r in pref_rows(8)]
    for r in rows[:3]:
        r["prompt"][0]["content"] = "How was the jacket? " * 30
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    result = ppo.main(ppo.Args(prompts=prompts, eval_split=None, max_prompt_length=40, batch_size=4,
                               minibatch_size=4, total_episodes=8, dry_run=True))
    assert result["train/prompts"] == 5
    assert "train prompts: dropped 3 of 8 prompts longer than --max_prompt_length 40" in capsys.readouterr().out
    for script, changes in [(ppo, dict(prompts=prompts, eval_split=None, dry_run=True)),
                            (dpo, dict(eval_prompts=prompts, eval_prompts_split="train", dry_run=True)),
                            (var, dict(eval_prompts=prompts, eval_prompts_split="train", dry_run=True)),
                            (dera, dict(prompts=prompts, prompts_split="train")),
                            (expo, dict(prompts=prompts, prompts_split="train"))]:
        fails(lambda: script.main(script.Args(**changes, max_prompt_length=5, output_dir=str(tmp_path / "out"))),
              "every prompt is longer than --max_prompt_length 5")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rows", [
    [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "rejected": "c"}],
    [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": 3, "rejected": "c"}],
    [],
], ids=["missing-field", "wrong-type", "empty-file"])
def test_a_malformed_dataset_fails_before_any_model_loads(tmp_path, monkeypatch, rows):
    """The tokenizer's or datasets' own error: no row-numbered checks of our own (issue 36)."""
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was read")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_loading)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) or "\n")
    out = tmp_path / "run"
    with pytest.raises((ValueError, SystemExit)):
        dpo.main(dpo.Args(dataset=str(data), eval_split=None, reward_model="none", output_dir=str(out)))
    assert not out.exists()


def test_a_path_that_does_not_exist_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    start = time.time()
    for name in ["runs/sft-typo", "./nowhere", str(tmp_path / "gone")]:
        fails(lambda: dpo.main(dpo.Args(model=name, dry_run=True, reward_model="none")),
              "no such file or directory")
    assert time.time() - start < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id offline: transformers' own error, at once
    with pytest.raises(OSError, match="offline mode"):
        dpo.main(dpo.Args(model="some-org/some-model", dry_run=True, reward_model="none"))


# --- models of the wrong kind ----------------------------------------------------------------------------
def test_a_causal_lm_as_reward_model_is_refused(tmp_path):
    out = tmp_path / "run"
    fails(lambda: dpo.main(dpo.Args(**TINY_DPO | {"reward_model": str(TOY / "sft")}, output_dir=str(out))),
          "LlamaForCausalLM")
    fails(lambda: dpo.load_model(str(TOY / "sft"), False, scalar=True), "needs a reward model")
    assert not (out / "model.safetensors").exists()


def test_a_reward_model_as_policy_or_aligned_model_is_refused(tmp_path):
    fails(lambda: dpo.load_model(str(TOY / "rm"), False), "LlamaForSequenceClassification")
    out = tmp_path / "run"
    fails(lambda: dera.main(dera.Args(aligned=[str(TOY / "rm")], num_prompts=2, max_new_tokens=4,
                                      output_dir=str(out))), "LlamaForSequenceClassification")
    assert not out.exists()


# --- training that goes wrong, and runs that stop --------------------------------------------------------
def test_non_finite_gradient_with_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_

    def overflow(params, *args, **kwargs):  # what an overflow in the backward pass leaves behind
        params = list(params)
        params[0].grad.view(-1)[0] = float("inf")
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflow)
    out = tmp_path / "run"
    fails(lambda: dpo.main(dpo.Args(**TINY_DPO, max_steps=3, output_dir=str(out))), "at step 1")
    assert not (out / "model.safetensors").exists()


def interrupt_at(monkeypatch, call: int, target=(torch.nn.utils, "clip_grad_norm_")):
    """Ctrl-C during the given call of `target` (by default: during the given optimiser step)."""
    real, calls = getattr(*target), []

    def maybe_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(*target, maybe_interrupt)


TINY = {dpo: dict(reward_model="none", eval_split=None, max_train_samples=32, batch_size=4),
        sft: dict(eval_split=None, max_train_samples=32, batch_size=4, num_samples=0),
        reward_model: dict(eval_split=None, max_train_samples=32, batch_size=4),
        var: dict(eval_prompts="none", train_split="train[:16]", batch_size=4, score_batch_size=16)}


def metrics(out: Path) -> list:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("script", [dpo, sft, reward_model, var])
def test_interrupted_run_resumes_on_the_same_loss_curve(script, tmp_path, monkeypatch):
    def run(out: str, **changes):
        return script.main(script.Args(**TINY[script], max_steps=6, log_every=1, save_every=3, output_dir=out,
                                       **changes))
    run(str(tmp_path / "whole"))
    interrupted = str(tmp_path / "stopped")
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            run(interrupted)
    assert script.last_checkpoint(Path(interrupted)).name == "checkpoint-000003"
    fails(lambda: run(interrupted), "pass --resume to continue it")  # a plain rerun refuses, and says how
    fails(lambda: run(interrupted, resume=True, learning_rate=1e-3), "learning_rate")  # not the same run
    run(interrupted, resume=True)
    whole, resumed = metrics(tmp_path / "whole"), metrics(Path(interrupted))
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole, resumed):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-5, abs_tol=1e-6), (a, b)
        assert a["train/lr"] == b["train/lr"]
    fails(lambda: run(interrupted, resume=True), "no unfinished run")  # a finished run is not resumed again


def test_a_checkpoint_save_that_dies_leaves_the_previous_one_the_one_to_resume(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "run"
    args = dict(**TINY[dpo], log_every=1, max_steps=6, save_every=2, output_dir=str(out))
    with monkeypatch.context() as m:
        interrupt_at(m, 2, target=(dcp, "save"))  # killed while writing the step-4 checkpoint's shards
        with pytest.raises(KeyboardInterrupt):
            dpo.main(dpo.Args(**args))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    assert not (out / "checkpoint-000004" / ".metadata").exists()  # DCP writes it last
    assert dpo.last_checkpoint(out).name == "checkpoint-000002"
    dpo.main(dpo.Args(**args, resume=True))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob("checkpoint-*")) and (out / "model.safetensors").exists()  # finished: removed


def test_args_json_records_how_to_reproduce_the_run(tmp_path):
    out = tmp_path / "run"
    dpo.main(dpo.Args(**TINY_DPO, max_steps=1, output_dir=str(out)))
    recorded = json.load(open(out / "args.json"))
    assert recorded["beta"] == 0.1 and recorded["output_dir"] == str(out)
    run = recorded["run"]
    assert run["torch"] == torch.__version__ and run["device"] == "cpu" and run["dtype"] == "float32"
    assert {"transformers", "datasets", "git_commit", "python"} <= set(run)


def test_help_opens_with_a_description_and_an_example(capsys):
    import tyro

    for script in [sft, reward_model, dpo, ppo, var, dera, expo]:
        with pytest.raises(SystemExit):
            tyro.cli(script.Args, args=["--help"])
        text = capsys.readouterr().out
        head = text[: text.index("╭")] if "╭" in text else text[:1500]
        assert "Example: python" in head and f"{script.__name__}.py" in head, (script.__name__, head)


# --- the decoding scripts --------------------------------------------------------------------------------
def test_dera_accepts_a_single_lambda_and_aligned_model(tmp_path):
    out = tmp_path / "run"
    results = dera.main(dera.Args(lambdas=0.5, aligned=str(TOY / "dpo"), num_prompts=4, max_new_tokens=8,
                                  output_dir=str(out), reward_model="none"))
    assert [row["lambda"] for row in results["table"]] == ["0.5"]
    assert json.load(open(out / "args.json"))["lambdas"] == [0.5]


# --- a copied file runs on its own -----------------------------------------------------------------------
def inline_metadata(path: Path) -> dict:
    """The PEP 723 `script` block at the top of a file, parsed as TOML."""
    import tomllib

    lines = path.read_text().splitlines()
    start, end = lines.index("# /// script"), lines.index("# ///")
    return tomllib.loads("\n".join(line.removeprefix("#").removeprefix(" ") for line in lines[start + 1 : end]))


def test_every_script_declares_the_runtime_requirements():
    requirements = [line.strip() for line in open(Path(__file__).parent.parent / "requirements.txt")
                    if line.strip() and not line.startswith("#")]
    runtime = [r for r in requirements if not r.startswith("pytest")]
    assert len(runtime) == len(requirements) - 1
    for script in [sft, reward_model, dpo, ppo, var, dera, expo]:
        metadata = inline_metadata(Path(script.__file__))
        assert metadata["dependencies"] == runtime, script.__name__
        assert metadata["requires-python"] == ">=3.10"
