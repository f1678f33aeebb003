"""The papers' headline claims, reproduced in miniature on the toy: one command trains and evaluates
everything through the scripts' own command lines, as a user would, then writes the tables (and, with
matplotlib installed, the plots).

    pip install -r benchmark/requirements.txt
    python benchmark/run.py                  # everything (docs/benchmark.md: the time it takes)
    python benchmark/run.py --quick          # every study's shape, 1 seed, each run 1/8 long: 12 min
    python benchmark/run.py --studies dera   # one study (runs shared with other studies are reused)
    python benchmark/run.py --dry_run        # print the commands only
    python benchmark/report.py               # summary.json and the tables from whatever runs exist
    python benchmark/plots.py                # the plots, from summary.json

Four studies, all starting from the committed toy/sft (and toy/rm where a reward model is needed):
1. dera:      DeRa at lambda in LAMBDAS, realigning a DPO model trained to convergence at beta 0.1,
              against DPO retrained to convergence at beta / lambda (DeRa Sec. 5, Fig. 2)
2. expo:      DPO on FRACTIONS of its training pairs, each extrapolated over ALPHAS (ExPO Table 2, Fig. 6)
3. methods:   PPO vs DPO vs VAR from the same SFT model, and gold reward against KL across beta
              (Tulu 2.5 Table 2; DPO paper Fig. 2)
4. stability: held-out reward over LONGER x the default training, DPO vs VAR (VAR Fig. 2)

Every run lands in <runs_dir>/<study>/<config>/seed<N>/ (git-ignored). runs_dir/timings.json records each
finished run's command and wall time: a run whose eval.json exists and whose command is unchanged is
skipped, so an interrupted benchmark resumes where it stopped; a run whose command changed here, or
whose --aligned input was retrained, is trained again. The command is what is compared, not the
scripts: after changing a script's default, delete the runs it affects (or the whole runs_dir).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tyro

ROOT = Path(__file__).resolve().parent.parent
DPO_PAIRS = 4096  # dpo.py's toy default, --train_split "train[:4096]": the "100%" of study 2
BETA = 0.1  # dpo.py's default KL strength: the model DeRa realigns
LAMBDAS = [0.0, 0.5, 1.0, 2.0, 5.0]  # DeRa; retrained DPO at beta / lambda (lambda 0: the SFT model)
FRACTIONS = [0.1, 0.2, 0.4, 1.0]  # of DPO_PAIRS
ALPHAS = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]  # wide: the under-trained models need large alphas
PPO_BETAS = [0.05, 0.2]  # ppo.py's default, and a stronger KL penalty for a second frontier point
COMMON_TEMPERATURE = 1.0  # every method is sampled as the policy itself, so every KL is the true KL
# Study 1's DPO runs: every pair of the toy's train split (3x the default's) for CONVERGED_EPOCHS at
# CONVERGED_LR, the held-out loss and margins logged every EVAL_EVERY steps; chosen once for every beta
# from the curves of probes at beta 0.02, the slowest to converge (docs/benchmark.md, study 1)
CONVERGED_EPOCHS, CONVERGED_LR, EVAL_EVERY = 1, 3e-4, 64
TRAIN_PAIRS = 12288  # the toy's train split (toy/data/prefs/train.jsonl)
DPO_STEPS = 256  # dpo.py's default length: 4096 pairs / 16 per step
VAR_PROMPTS, VAR_STEPS = 1024, 512  # var.py's default: 2 epochs of 1024 pairs' 2048 responses, 8 per step
PPO_EPISODES = 6144  # ppo.py's default --total_episodes
LONGER = 4  # study 4 trains this many times the default length, sampled at the same 9 points
QUICK = 8  # --quick: every run is 1/QUICK of its length and samples 64 prompts


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """training and sampling seeds; every configuration runs once per seed"""
    stability_seeds: int = 2
    """how many of --seeds study 4 runs (its runs are the longest)"""
    studies: list[str] = field(default_factory=lambda: ["dera", "expo", "methods", "stability"])
    """which studies to run (a run two studies share is trained once)"""
    quick: bool = False
    """one seed, every run 1/8 of its length, 64 sampled prompts: each study's shape in 12 minutes,
    in benchmark/runs-quick and benchmark/runs-quick-results (never the committed results)"""
    runs_dir: Optional[str] = None
    """where the runs go (default: benchmark/runs, or benchmark/runs-quick with --quick); the tables go to
    benchmark/results for benchmark/runs, to <runs_dir>-results for any other"""
    dry_run: bool = False
    """print the commands without running them"""
    report: bool = True
    """write summary.json and the tables (benchmark/report.py), then the plots if matplotlib is there"""


def dpo_job(name: str, seed: int, beta: float = BETA, pairs: int = DPO_PAIRS, extra: tuple = ()) -> tuple:
    return name, ["dpo.py", "--beta", f"{beta:g}", "--train_split", f"train[:{pairs}]", "--seed", str(seed),
                  *extra]


def converged_dpo_job(name: str, seed: int, beta: float) -> tuple:
    return name, ["dpo.py", "--beta", f"{beta:g}", "--train_split", "train", "--num_epochs",
                  str(CONVERGED_EPOCHS), "--learning_rate", f"{CONVERGED_LR:g}", "--eval_every",
                  str(EVAL_EVERY), "--seed", str(seed)]


def jobs_for_seed(seed: int, studies: list[str], runs: str, stability: bool = True) -> list[tuple]:
    """(run name, script + arguments) in an order that respects dependencies; names are shared between
    studies, so a run two studies need is trained once."""
    s = f"seed{seed}"
    base = f"dpo/beta{BETA:g}/{s}"  # DPO at the default beta on the default pairs
    jobs = []
    if "dera" in studies or "methods" in studies:  # methods: the frontier across beta and lambda
        converged = {lam: f"dera/retrained/beta{BETA / lam:g}/{s}" for lam in LAMBDAS if lam > 0}
        jobs += [converged_dpo_job(run, seed, BETA / lam) for lam, run in converged.items()]
        jobs.append((f"dera/realigned/{s}", ["dera.py", "--aligned", f"{runs}/{converged[1.0]}", "--lambdas",
                                             *map(str, LAMBDAS), "--prompts_split", "test", "--num_prompts",
                                             "256", "--seed", str(seed)]))
    if "expo" in studies or "methods" in studies:
        jobs.append(dpo_job(base, seed, extra=("--sample_every", "32")))
    if "expo" in studies:
        for frac in FRACTIONS:
            run = base if frac == 1 else f"dpo/frac{frac:g}/{s}"
            if frac < 1:
                jobs.append(dpo_job(run, seed, pairs=round(frac * DPO_PAIRS)))
            jobs.append((f"expo/frac{frac:g}/{s}", ["expo.py", "--aligned", f"{runs}/{run}", "--alphas",
                                                    *map(str, ALPHAS), "--seed", str(seed)]))
    if "methods" in studies:
        jobs.append((f"var/default/{s}", ["var.py", "--seed", str(seed), "--sample_every", "64"]))
        jobs += [(f"ppo/beta{b:g}/{s}", ["ppo.py", "--beta", f"{b:g}", "--seed", str(seed),
                                         "--temperature", f"{COMMON_TEMPERATURE:g}"]) for b in PPO_BETAS]
    if "stability" in studies and stability:  # LONGER x the default length, 9 sampling points as there
        jobs.append(dpo_job(f"stability/dpo/{s}", seed, extra=(
            "--num_epochs", str(LONGER), "--sample_every", str(LONGER * DPO_STEPS // 8))))
        jobs.append((f"stability/var/{s}", ["var.py", "--seed", str(seed), "--num_epochs", str(2 * LONGER),
                                            "--sample_every", str(LONGER * VAR_STEPS // 8)]))
    return jobs


def quick_version(cmd: list[str]) -> list[str]:
    """The same run at 1/QUICK of its length, for as many epochs (DPO: 1/QUICK of its pairs, held-out
    pairs too; VAR: of its prompts; PPO: of its episodes), with every periodic interval divided by
    QUICK, so that the schedule and the sampling points keep their shape; 64 prompts sampled instead of
    128-256."""
    script, argv = cmd[0], cmd[1:]
    flags = dict(zip(argv, argv[1:]))
    out = [script]
    for i, arg in enumerate(argv):
        previous = argv[i - 1] if i else ""
        if previous in ("--sample_every", "--eval_every"):
            arg = str(max(1, int(arg) // QUICK))
        out.append("64" if previous == "--num_prompts" else arg)
    if script == "dpo.py":
        split = flags["--train_split"]
        pairs = TRAIN_PAIRS if split == "train" else int(split.removeprefix("train[:").removesuffix("]"))
        out += ["--max_train_samples", str(max(16, pairs // QUICK)), "--max_eval_samples", "64",
                "--num_eval_prompts", "64"]
    elif script == "var.py":  # its default --train_split "train[:1024]"
        out += ["--train_split", f"train[:{VAR_PROMPTS // QUICK}]", "--num_eval_prompts", "64"]
    elif script == "ppo.py":
        out += ["--total_episodes", str(PPO_EPISODES // QUICK), "--num_eval_prompts", "64"]
    elif "--num_prompts" not in flags:  # expo: its 128 validation prompts
        out += ["--num_prompts", "64"]
    return out


def planned_jobs(args: Args, runs: str) -> list[tuple[str, list[str]]]:
    """Every run of the benchmark, once each, in dependency order."""
    seeds = args.seeds[:1] if args.quick else args.seeds
    jobs = {}
    for i, seed in enumerate(seeds):
        for name, cmd in jobs_for_seed(seed, args.studies, runs, stability=i < max(1, args.stability_seeds)):
            jobs.setdefault(name, quick_version(cmd) if args.quick else cmd)  # a shared run: planned once
    return list(jobs.items())


def results_dir(runs: Path) -> Path:
    """Where a runs folder's tables go: benchmark/runs -> benchmark/results (committed), any other
    folder (--quick's, or your own) -> <runs>-results, never the committed one."""
    return Path("benchmark/results") if runs == Path("benchmark/runs") else Path(f"{runs}-results")


def main(args: Args) -> None:
    runs = Path(args.runs_dir or ("benchmark/runs-quick" if args.quick else "benchmark/runs"))
    timings_file = ROOT / runs / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    jobs = planned_jobs(args, str(runs))
    redo, start = set(), time.time()  # redo: the runs this call (re)trains
    for i, (name, cmd) in enumerate(jobs, 1):
        out = ROOT / runs / name
        command = " ".join(cmd)
        full = [sys.executable, *cmd, "--output_dir", str(runs / name)]
        # done: finished with this very command, after the run it reads (--aligned) last finished
        upstream = dict(zip(cmd, cmd[1:])).get("--aligned", "").removeprefix(f"{runs}/")
        done = timings.get(name, {})
        if ((out / "eval.json").exists() and done.get("command") == command and upstream not in redo
                and done.get("finished", 0) >= timings.get(upstream, {}).get("finished", 0)):
            print(f"[{i}/{len(jobs)}] {name}: done already ({timings[name]['seconds']} s)")
            continue
        print(f"[{i}/{len(jobs)}] {name}: {' '.join(full[1:])}", flush=True)
        redo.add(name)
        if args.dry_run:
            continue
        if out.exists():  # an interrupted run, or one whose command or input changed: train it again
            shutil.rmtree(out)
        timings.pop(name, None)  # unfinished until it ends: an interruption leaves no stale entry
        timings_file.parent.mkdir(parents=True, exist_ok=True)
        timings_file.write_text(json.dumps(timings, indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        job_start = time.time()
        with open(out.parent / f"{out.name}.log", "w") as log:
            code = subprocess.call(full, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise SystemExit(f"error: {name} failed (exit {code}); see {out.parent / out.name}.log, then "
                             "run the same command again to resume")
        timings[name] = {"seconds": round(time.time() - job_start, 1), "command": command,
                         "finished": round(time.time())}
        timings_file.write_text(json.dumps(timings, indent=1))
        minutes = (time.time() - start) / 60
        print(f"    {timings[name]['seconds']:.0f} s (this call so far: {minutes:.1f} min)", flush=True)
    if args.report and not args.dry_run:
        results = str(results_dir(runs))
        report = ["benchmark/report.py", "--runs_dir", str(runs), "--results_dir", results]
        subprocess.check_call([sys.executable, *report], cwd=ROOT)
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib is not installed: no plots (pip install -r benchmark/requirements.txt)")
        else:
            subprocess.check_call([sys.executable, "benchmark/plots.py", "--results_dir", results], cwd=ROOT)


if __name__ == "__main__":
    main(tyro.cli(Args))
