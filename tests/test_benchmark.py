"""benchmark/: the plan of benchmark/run.py (the runs themselves take over an hour and are not part of the
suite) and the tables, which must be exactly what benchmark/report.py renders from the committed
summary.json, in results.md and in docs/benchmark.md alike."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmark import report, run  # noqa: E402


def flags(cmd: list[str]) -> dict:
    return dict(zip(cmd[1:], cmd[2:]))


def test_every_run_is_planned_once_before_its_users():
    for seed in [0, 1]:  # a run two studies share is the same run in both
        commands = {}
        for study in ["dera", "expo", "methods", "stability"]:
            for name, cmd in run.jobs_for_seed(seed, [study], "benchmark/runs"):
                assert commands.setdefault(name, cmd) == cmd, name
    jobs = run.planned_jobs(run.Args(), "benchmark/runs")
    first = {name: i for i, (name, _) in enumerate(jobs)}
    for i, (name, cmd) in enumerate(jobs):
        assert (ROOT / cmd[0]).exists()
        argv = flags(cmd)
        if "--aligned" in argv:  # DeRa and ExPO read a DPO run trained earlier in the plan
            assert first[argv["--aligned"].removeprefix("benchmark/runs/")] < i, name
        if name.startswith("dera/retrained/"):  # study 1: beta as named, trained on every pair, curves
            assert float(argv["--beta"]) == float(name.split("/")[2].removeprefix("beta"))
            assert argv["--train_split"] == "train" and argv["--num_epochs"] == str(run.CONVERGED_EPOCHS)
            assert "--eval_every" in argv
    for seed in [0, 1, 2]:  # DPO retrained at beta / lambda for every lambda DeRa sweeps, DeRa on beta 0.1
        for lam in run.LAMBDAS[1:]:
            assert f"dera/retrained/beta{run.BETA / lam:g}/seed{seed}" in first
        dera = flags(dict(jobs)[f"dera/realigned/seed{seed}"])
        assert dera["--aligned"].endswith(f"dera/retrained/beta{run.BETA:g}/seed{seed}")


def test_the_stability_study_trains_longer_with_the_same_sampling_points():
    jobs = dict(run.planned_jobs(run.Args(), "benchmark/runs"))
    default_dpo, long_dpo = flags(jobs["dpo/beta0.1/seed0"]), flags(jobs["stability/dpo/seed0"])
    assert int(long_dpo["--num_epochs"]) == run.LONGER  # the default is 1 epoch, sampled every 32 steps
    assert int(long_dpo["--sample_every"]) == run.LONGER * int(default_dpo["--sample_every"])
    long_var = flags(jobs["stability/var/seed0"])
    assert int(long_var["--num_epochs"]) == 2 * run.LONGER  # var.py's default: 2 epochs, 512 steps
    assert int(long_var["--sample_every"]) * 8 == run.LONGER * run.VAR_STEPS
    assert sum(name.startswith("stability/dpo/") for name in jobs) == run.Args().stability_seeds


def test_quick_runs_every_study_at_an_eighth_of_its_length():
    full = run.planned_jobs(run.Args(seeds=[0]), "benchmark/runs-quick")
    quick = run.planned_jobs(run.Args(quick=True), "benchmark/runs-quick")
    assert [name for name, _ in quick] == [name for name, _ in full]  # every run of every study, seed 0
    for (name, cmd), (_, short) in zip(full, quick):
        long, brief = flags(cmd), flags(short)
        for key in ("--sample_every", "--eval_every"):
            if key in long:
                assert int(brief[key]) == max(1, int(long[key]) // run.QUICK), name
        assert brief.get("--num_epochs") == long.get("--num_epochs"), name  # the same passes, less data
        if cmd[0] == "dpo.py":
            pairs = run.TRAIN_PAIRS if long["--train_split"] == "train" else int(long["--train_split"][7:-1])
            assert int(brief["--max_train_samples"]) == max(16, pairs // run.QUICK), name
            assert brief["--max_eval_samples"] == brief["--num_eval_prompts"] == "64"
        if cmd[0] == "var.py":
            assert brief["--train_split"] == f"train[:{run.VAR_PROMPTS // run.QUICK}]"
        if cmd[0] == "ppo.py":
            assert int(brief["--total_episodes"]) * run.QUICK == 6144
        if cmd[0] in ("dera.py", "expo.py"):
            assert brief["--num_prompts"] == "64"


def test_a_run_is_redone_when_its_command_or_its_input_changed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "ROOT", tmp_path)
    args = run.Args(seeds=[0], studies=["expo"], runs_dir="runs", dry_run=True, report=False)
    jobs = dict(run.planned_jobs(args, "runs"))
    timings = {}
    for finished, name in enumerate(jobs, 1):  # every run finished, each after the one before
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "eval.json").write_text("{}")
        timings[name] = {"seconds": 1, "command": " ".join(jobs[name]), "finished": finished}
    timings["dpo/frac0.1/seed0"]["command"] += " --beta 0.2"  # trained with another command
    timings["dpo/frac0.2/seed0"]["finished"] = 10**9  # retrained after ExPO read it
    (tmp_path / "runs" / "timings.json").write_text(json.dumps(timings))
    run.main(args)
    redone = [line.split("]")[1].split(":")[0].strip() for line in capsys.readouterr().out.splitlines()
              if "done already" not in line]
    assert redone == ["dpo/frac0.1/seed0", "expo/frac0.1/seed0", "expo/frac0.2/seed0"]


def test_tables_are_rendered_from_the_committed_summary():
    """Every number of the benchmark's tables, in results.md and in docs/benchmark.md, is summary.json's."""
    summary = json.loads((ROOT / "benchmark/results/summary.json").read_text())
    tables = report.render(summary)
    assert all(summary.get(key) for key in ("convergence", "dera", "expo", "methods", "stability", "speed"))
    results = (ROOT / "benchmark/results/results.md").read_text()
    assert results.strip() == report.results_md(summary).strip()
    page = report.blocks((ROOT / "docs" / "benchmark.md").read_text())
    assert set(page) == set(report.SECTIONS)
    for name, text in page.items():
        assert text == tables[name], f"docs/benchmark.md's {name} table differs from summary.json's"


def test_fill_blocks_replaces_only_the_blocks():
    text = "a\n<!-- benchmark:dera -->\nold\n<!-- /benchmark:dera -->\nb\n"
    assert report.fill_blocks(text, {"dera": "new | table"}) == (
        "a\n<!-- benchmark:dera -->\nnew | table\n<!-- /benchmark:dera -->\nb\n")
    assert report.blocks(text) == {"dera": "old"}
    empty = "<!-- benchmark:expo -->\n<!-- /benchmark:expo -->"  # a new block, not yet filled
    assert report.blocks(report.fill_blocks(empty, {"expo": "x"})) == {"expo": "x"}


def test_every_run_of_a_seed_draws_that_seed_and_sweeps_differ_only_by_their_setting():
    """Every planned run passes its seed (a run left at the default seed would share seed 0's random
    numbers in every repeat), and the points of one sweep at one seed (runs named alike but for a
    number) differ in one flag alone, their setting: two points of a curve differ by it, not by noise."""
    import re

    for seed in [0, 1, 2]:
        sweeps = {}
        for name, cmd in run.jobs_for_seed(seed, ["dera", "expo", "methods", "stability"], "benchmark/runs"):
            options = {}
            for token in cmd[1:]:  # --flag value [value ...]
                if token.startswith("--"):
                    options[key := token] = []
                else:
                    options[key].append(token)
            assert options["--seed"] == [str(seed)], name
            sweeps.setdefault((cmd[0], re.sub(r"[0-9.]+", "N", name)), []).append(options)
        assert any(len(points) > 2 for points in sweeps.values())
        for sweep, points in sweeps.items():
            for point in points[1:]:
                differing = {k for k in point.keys() | points[0].keys() if point.get(k) != points[0].get(k)}
                assert len(differing) == 1, (sweep, differing)
