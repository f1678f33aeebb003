"""The papers' headline claims, reproduced in miniature on the toy: one command trains and evaluates
everything through the scripts' own command lines, as a user would, then writes the tables and plots.

    pip install -r benchmark/requirements.txt
    python benchmark/run.py                  # everything: 3 seeds (see README for the time it takes)
    python benchmark/run.py --seeds 0        # one seed
    python benchmark/run.py --dry_run        # print the commands only
    python benchmark/report.py               # tables and plots from whatever runs exist

Four studies, all starting from the committed toy/sft (and toy/rm where a reward model is needed):
1. dera:      DeRa at lambda in LAMBDAS against DPO retrained at beta / lambda (DeRa Sec. 5, Fig. 2)
2. expo:      DPO on FRACTIONS of its training pairs, each extrapolated over ALPHAS (ExPO Table 2, Fig. 6)
3. methods:   PPO vs DPO vs VAR from the same SFT model, and gold reward against KL across beta
              (Tulu 2.5 Table 2; DPO paper Fig. 2)
4. stability: held-out reward over training, DPO vs VAR (VAR Fig. 2), from --sample_every

Every run lands in benchmark/runs/<study>/<config>/seed<N>/ (git-ignored). A run whose eval.json exists
is skipped, so an interrupted benchmark resumes where it stopped; wall times go to runs/timings.json.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
DPO_PAIRS = 4096  # dpo.py's toy default, --train_split "train[:4096]": the "100%" of study 2
BETA = 0.1  # dpo.py's default KL strength: the model DeRa realigns
LAMBDAS = [0.0, 0.5, 1.0, 2.0, 5.0]  # DeRa; retrained DPO at beta / lambda (lambda 0: the SFT model)
FRACTIONS = [0.1, 0.2, 0.4, 1.0]  # of DPO_PAIRS
ALPHAS = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]  # wide: the under-trained models need large alphas
PPO_BETAS = [0.05, 0.2]  # ppo.py's default, and a stronger KL penalty for a second frontier point
COMMON_TEMPERATURE = 1.0  # every method is sampled as the policy itself, so every KL is the true KL


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """training and sampling seeds; every configuration runs once per seed"""
    studies: list[str] = field(default_factory=lambda: ["dera", "expo", "methods", "stability"])
    """which studies to run (their runs are shared: DPO at beta 0.1 serves all four)"""
    runs_dir: str = "benchmark/runs"
    """where the runs go"""
    dry_run: bool = False
    """print the commands without running them"""
    report: bool = True
    """write the tables and plots (benchmark/report.py) at the end"""


def dpo_job(name: str, seed: int, beta: float = BETA, pairs: int = DPO_PAIRS, sample_every=None) -> tuple:
    cmd = ["dpo.py", "--beta", f"{beta:g}", "--train_split", f"train[:{pairs}]", "--seed", str(seed)]
    return name, cmd + (["--sample_every", str(sample_every)] if sample_every else [])


def jobs_for_seed(seed: int, studies: list[str], runs: str) -> list[tuple[str, list[str]]]:
    """(run name, script + arguments) in an order that respects dependencies; names are shared between
    studies, so a run two studies need is trained once."""
    s = f"seed{seed}"
    base = f"dpo/beta{BETA:g}/{s}"  # DPO at the default beta on all pairs, sampled 8 times during training
    jobs = [dpo_job(base, seed, sample_every=32)]
    if "dera" in studies or "methods" in studies:
        jobs += [dpo_job(f"dpo/beta{BETA / lam:g}/{s}", seed, beta=BETA / lam) for lam in LAMBDAS if lam > 0]
        jobs.append((f"dera/{s}", ["dera.py", "--aligned", f"{runs}/{base}", "--lambdas", *map(str, LAMBDAS),
                                   "--prompts_split", "test", "--num_prompts", "256", "--seed", str(seed)]))
    if "expo" in studies:
        for frac in FRACTIONS:
            run = base if frac == 1 else f"dpo/frac{frac:g}/{s}"
            if frac < 1:
                jobs.append(dpo_job(run, seed, pairs=round(frac * DPO_PAIRS)))
            jobs.append((f"expo/frac{frac:g}/{s}", ["expo.py", "--aligned", f"{runs}/{run}", "--alphas",
                                                    *map(str, ALPHAS), "--seed", str(seed)]))
    if "methods" in studies or "stability" in studies:
        jobs.append((f"var/beta{BETA:g}/{s}", ["var.py", "--seed", str(seed), "--sample_every", "64"]))
    if "methods" in studies:
        jobs += [(f"ppo/beta{b:g}/{s}", ["ppo.py", "--beta", f"{b:g}", "--seed", str(seed),
                                         "--temperature", f"{COMMON_TEMPERATURE:g}"]) for b in PPO_BETAS]
    return jobs


def main(args: Args) -> None:
    runs = Path(args.runs_dir)
    timings_file = ROOT / runs / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    jobs = [job for seed in args.seeds for job in jobs_for_seed(seed, args.studies, args.runs_dir)]
    seen = set()
    jobs = [(name, cmd) for name, cmd in jobs if not (name in seen or seen.add(name))]  # each run once
    start = time.time()
    for i, (name, cmd) in enumerate(jobs, 1):
        out = ROOT / runs / name
        full = [sys.executable, *cmd, "--output_dir", str(runs / name)]
        if (out / "eval.json").exists():
            print(f"[{i}/{len(jobs)}] {name}: done already ({timings.get(name, '?')} s)")
            continue
        if out.exists():  # an interrupted run: start it again
            full.append("--overwrite")
        print(f"[{i}/{len(jobs)}] {name}: {' '.join(full[1:])}", flush=True)
        if args.dry_run:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        job_start = time.time()
        with open(out.parent / f"{out.name}.log", "w") as log:
            code = subprocess.call(full, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise SystemExit(f"error: {name} failed (exit {code}); see {out.parent / out.name}.log, then "
                             "run the same command again to resume")
        timings[name] = round(time.time() - job_start, 1)
        timings_file.write_text(json.dumps(timings, indent=1))
        minutes = (time.time() - start) / 60
        print(f"    {timings[name]:.0f} s (this call so far: {minutes:.1f} min)", flush=True)
    if args.report and not args.dry_run:
        subprocess.check_call([sys.executable, "benchmark/report.py", "--runs_dir", args.runs_dir], cwd=ROOT)


if __name__ == "__main__":
    main(tyro.cli(Args))
