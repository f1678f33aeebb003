"""Tables and plots from the runs that benchmark/run.py wrote: benchmark/results/results.md, one .png per
study and summary.json (every number in the tables).

    python benchmark/report.py

Gold reward and grammaticality are the toy world's own (toy/make.py), computed here on every run's
samples; KL is the samples' mean log pi(y|x) - log pi_ref(y|x), each script's eval/kl; score is toy/rm's.
The gold reward is unbounded in repeated praise, so a degenerate model that spams praise for 250 tokens
scores 100+: "usable gold" counts a response's gold only when it is grammatical (0 otherwise), the number
to read when a method trades grammar for reward.
A number "m ± s" is the mean over seeds and its standard error, s = std / sqrt(seeds). Each seed's value
is itself a mean over its samples (256 test prompts; ExPO: 128 validation prompts, as the paper selects
alpha on dev prompts).
"""

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmark.run import ALPHAS, BETA, DPO_PAIRS, FRACTIONS, LAMBDAS, PPO_BETAS  # noqa: E402
from toy.make import gold_reward, is_grammatical  # noqa: E402


@dataclass
class Args:
    runs_dir: str = "benchmark/runs"
    """the runs written by benchmark/run.py"""
    results_dir: str = "benchmark/results"
    """where the tables and plots go"""


# ---------------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def prompt_text(prompt) -> str:  # the toy's prompts are message lists of one user turn
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def sample_stats(rows: list[dict]) -> dict:
    """The per-run numbers every table is made of, from one run's samples."""
    n = len(rows)
    gold = [gold_reward(prompt_text(r["prompt"]), r["response"]) for r in rows]
    grammatical = [is_grammatical(r["response"]) for r in rows]
    return {"gold": sum(gold) / n, "grammatical": sum(grammatical) / n,
            "usable": sum(g for g, ok in zip(gold, grammatical) if ok) / n,
            "kl": sum(r["logratio"] for r in rows) / n,
            "score": sum(r["score"] for r in rows) / n,
            "length": sum(r["length"] for r in rows) / n}


def seed_dirs(runs: Path, config: str) -> list[Path]:
    """The finished seeds of one configuration, e.g. config = "dpo/beta0.1"."""
    return sorted(d for d in (runs / config).glob("seed*") if (d / "eval.json").exists())


def over_seeds(per_seed: list[dict]) -> dict:
    """{metric: (mean, standard error)} over seeds; the error is nan with a single seed."""
    out = {}
    for key in per_seed[0]:
        values = [s[key] for s in per_seed]
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
        out[key] = (statistics.mean(values), se)
    out["seeds"] = len(per_seed)
    return out


def config_stats(runs: Path, config: str, file: str = "samples.jsonl", where: tuple = None) -> dict | None:
    """Aggregated sample_stats of a configuration's seeds; `where` = (column, value) picks rows of a
    sweep's samples (DeRa's lambda, ExPO's alpha)."""
    per_seed = []
    for d in seed_dirs(runs, config):
        rows = read_jsonl(d / file)
        if where:
            rows = [r for r in rows if r[where[0]] == where[1]]
        per_seed.append(sample_stats(rows))
    return over_seeds(per_seed) if per_seed else None


def fmt(stat: tuple, digits: int = 2, percent: bool = False) -> str:
    mean, se = stat
    scale, unit = (100, "%") if percent else (1, "")
    if math.isnan(se):
        return f"{scale * mean:.{digits}f}{unit}"
    return f"{scale * mean:.{digits}f} ± {scale * se:.{digits}f}{unit}"


def seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n > 1 else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def errorbar(ax, xs, stats, key, **kw):
    errors = [0 if math.isnan(s[key][1]) else s[key][1] for s in stats]  # one seed: no error bar
    ax.errorbar(xs, [s[key][0] for s in stats], yerr=errors, capsize=3, **kw)


# ---------------------------------------------------------------------------------------------------
# The four studies: each returns its markdown and saves its plot
# ---------------------------------------------------------------------------------------------------
def study_dera(runs: Path, results: Path, summary: dict) -> str:
    """DeRa at lambda against DPO retrained at beta / lambda (DeRa Sec. 5.2, Fig. 2)."""
    dera = {lam: config_stats(runs, "dera", where=("lambda", f"{lam:g}")) for lam in LAMBDAS}
    retrained = {lam: config_stats(runs, f"dpo/beta{BETA / lam:g}") if lam > 0 else dera[0.0]
                 for lam in LAMBDAS}  # lambda 0: beta infinite, the SFT model itself
    if any(v is None for v in [*dera.values(), *retrained.values()]):
        return "## 1. DeRa vs retrained DPO\n\n(runs missing)\n"
    summary["dera"] = {f"{lam:g}": {"dera": dera[lam], "retrained": retrained[lam]} for lam in LAMBDAS}
    rows = [[f"{lam:g}", "∞ (SFT)" if lam == 0 else f"{BETA / lam:g}",
             fmt(dera[lam]["gold"]), fmt(retrained[lam]["gold"]), fmt(dera[lam]["usable"]),
             fmt(retrained[lam]["usable"]), fmt(dera[lam]["kl"]), fmt(retrained[lam]["kl"]),
             fmt(dera[lam]["grammatical"], 0, True), fmt(retrained[lam]["grammatical"], 0, True)]
            for lam in LAMBDAS]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, label in zip(axes, ["gold", "usable", "kl", "grammatical"],
                              ["gold reward", "usable gold (grammatical responses)", "KL(pi || pi_sft)",
                               "grammatical fraction"]):
        errorbar(ax, LAMBDAS, [dera[lam] for lam in LAMBDAS], key, marker="s", label="DeRa at lambda")
        errorbar(ax, LAMBDAS, [retrained[lam] for lam in LAMBDAS], key, marker="^", linestyle="--",
                 label="DPO retrained at beta / lambda")
        ax.set_xlabel(f"lambda (retrained at beta = {BETA:g} / lambda)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("symlog", linthresh=1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"DeRa realigns DPO (beta {BETA}) at decoding time: does it predict retraining?")
    fig.tight_layout()
    fig.savefig(results / "dera.png", dpi=110)
    n = dera[0.0]["seeds"]
    return ("## 1. DeRa vs retrained DPO (DeRa Fig. 2)\n\n![DeRa](dera.png)\n\n"
            + table(["λ", "β/λ", "gold: DeRa", "gold: retrained", "usable gold: DeRa",
                     "usable gold: retrained", "KL: DeRa", "KL: retrained", "grammatical: DeRa",
                     "grammatical: retrained"], rows)
            + f"\n\n{seeds(n)}; 256 test prompts per seed; temperature 1.\n")


def study_expo(runs: Path, results: Path, summary: dict) -> str:
    """DPO trained on fractions of the pairs, each extrapolated (ExPO Table 2, Fig. 6)."""
    stats = {f: {a: config_stats(runs, f"expo/frac{f:g}", where=("alpha", a)) for a in ALPHAS}
             for f in FRACTIONS}
    if any(s is None for per in stats.values() for s in per.values()):
        return "## 2. ExPO on under-trained DPO models\n\n(runs missing)\n"
    rows, summary["expo"] = [], {}
    for f in FRACTIONS:
        # the paper's procedure: the reward model picks alpha on the dev prompts (per seed), gold judges it
        chosen = []
        for d in seed_dirs(runs, f"expo/frac{f:g}"):
            best = json.loads((d / "eval.json").read_text())["best_alpha"]
            samples = read_jsonl(d / "samples.jsonl")
            chosen.append({**sample_stats([r for r in samples if r["alpha"] == best]), "alpha": best})
        picked = over_seeds(chosen)
        # the oracle: the alpha with the best mean usable gold, which no method could know
        oracle = max(ALPHAS, key=lambda a: stats[f][a]["usable"][0])
        gain = stats[f][oracle]["usable"][0] - stats[f][0.0]["usable"][0]
        summary["expo"][f"{f:g}"] = {"by_alpha": {f"{a:g}": stats[f][a] for a in ALPHAS},
                                     "rm_selected": picked, "oracle_alpha": oracle, "oracle_gain": gain}
        rows.append([f"{f:.0%} ({round(f * DPO_PAIRS)} pairs)", fmt(stats[f][0.0]["usable"]),
                     ", ".join(f"{c['alpha']:g}" for c in chosen), fmt(picked["gold"]), fmt(picked["usable"]),
                     fmt(picked["grammatical"], 0, True), f"{oracle:g}", fmt(stats[f][oracle]["usable"]),
                     f"{gain:+.2f}"])
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for f in FRACTIONS:
        for ax, key in zip(axes, ["usable", "gold", "score", "grammatical"]):
            errorbar(ax, ALPHAS, [stats[f][a] for a in ALPHAS], key, marker="o",
                     label=f"DPO on {f:.0%} of the pairs")
    axes[1].set_yscale("symlog", linthresh=10)
    labels = ["usable gold (grammatical responses)", "gold reward", "reward-model score (selects alpha)",
              "grammatical fraction"]
    for ax, label in zip(axes, labels):
        ax.set_xscale("symlog", linthresh=0.25)
        ax.set_xticks(ALPHAS, [f"{a:g}" for a in ALPHAS])
        ax.set_xlabel("alpha (theta_dpo + alpha (theta_dpo - theta_sft))")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("ExPO: extrapolating DPO models trained on less data")
    fig.tight_layout()
    fig.savefig(results / "expo.png", dpi=110)
    return ("## 2. ExPO on under-trained DPO models (ExPO Table 2, Fig. 6)\n\n![ExPO](expo.png)\n\n"
            + table(["DPO data", "usable gold at α = 0", "α picked by the RM (per seed)",
                     "gold at picked α", "usable gold at picked α", "grammatical at picked α",
                     "best α by usable gold (oracle)", "its usable gold", "gain over α = 0"], rows)
            + f"\n\n{seeds(stats[1.0][0.0]['seeds'])}; 128 validation prompts per seed; temperature 1.\n")


def study_methods(runs: Path, results: Path, summary: dict, timings: dict) -> str:
    """PPO vs DPO vs VAR from one SFT model (Tulu 2.5 Table 2), and the reward-KL frontier (DPO Fig. 2)."""
    configs = [("SFT (toy/sft)", "dera", ("lambda", "0")), (f"DPO, β {BETA:g}", f"dpo/beta{BETA:g}", None),
               (f"VAR, β {BETA:g}", f"var/beta{BETA:g}", None)]
    configs += [(f"PPO, β {b:g}", f"ppo/beta{b:g}", None) for b in PPO_BETAS]
    stats = {name: config_stats(runs, config, where=where) for name, config, where in configs}
    if any(s is None for s in stats.values()):
        return "## 3. PPO vs DPO vs VAR\n\n(runs missing)\n"
    summary["methods"] = stats
    rows = []
    for name, config, _ in configs:
        minutes = [t / 60 for k, t in timings.items() if k.startswith(config + "/seed") and config != "dera"]
        s = stats[name]
        rows.append([name, fmt(s["gold"]), fmt(s["usable"]), fmt(s["kl"]), fmt(s["grammatical"], 0, True),
                     fmt(s["score"]),
                     f"{s['length'][0]:.1f}", f"{statistics.mean(minutes):.1f}" if minutes else "—"])

    # the frontier: every configuration's (KL, gold), with DPO across beta and DeRa across lambda
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    dpo_betas = sorted({BETA / lam for lam in LAMBDAS if lam > 0})
    families = [("DPO across β", [config_stats(runs, f"dpo/beta{b:g}") for b in dpo_betas], "o-"),
                ("DeRa across λ", [config_stats(runs, "dera", where=("lambda", f"{lam:g}"))
                                   for lam in LAMBDAS], "s:"),
                ("PPO across β", [stats[f"PPO, β {b:g}"] for b in PPO_BETAS], "D-"),
                ("VAR", [stats[f"VAR, β {BETA:g}"]], "*"),
                ("SFT", [stats["SFT (toy/sft)"]], "k+")]
    for ax, key in zip(axes, ["gold", "usable"]):
        for label, points, style in families:
            points = sorted((p for p in points if p), key=lambda p: p["kl"][0])
            ax.errorbar([p["kl"][0] for p in points], [p[key][0] for p in points],
                        xerr=[0 if math.isnan(p["kl"][1]) else p["kl"][1] for p in points],
                        yerr=[0 if math.isnan(p[key][1]) else p[key][1] for p in points],
                        fmt=style, capsize=3, label=label, markersize=8)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("KL(pi || pi_sft) of the samples (nats)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=10)
    axes[0].set_ylabel("gold reward")
    axes[1].set_ylabel("usable gold (grammatical responses)")
    axes[0].legend()
    fig.suptitle("Reward against KL to the SFT model, every method sampled at temperature 1")
    fig.tight_layout()
    fig.savefig(results / "methods.png", dpi=110)
    return ("## 3. PPO vs DPO vs VAR from the same SFT model (Tulu 2.5 Table 2; DPO Fig. 2)\n\n"
            "![methods](methods.png)\n\n"
            + table(["method", "gold", "usable gold", "KL to SFT", "grammatical", "RM score",
                     "length (tokens)",
                     "minutes per run"], rows)
            + f"\n\n{seeds(stats['SFT (toy/sft)']['seeds'])}; 256 test prompts per seed; every method "
              "sampled at temperature 1 (PPO also trained at 1).\n")


def curve(runs: Path, config: str) -> tuple[list[float], list[dict]]:
    """Sample stats over training, as a fraction of the run's steps, from --sample_every."""
    per_step = {}
    for d in seed_dirs(runs, config):
        total = json.loads((d / "eval.json").read_text())["train/steps"]
        files = [(int(p.stem.split("_")[1]), p) for p in (d / "samples").glob("step_*.jsonl")]
        for step, path in files + [(total, d / "samples.jsonl")]:
            per_step.setdefault(step / total, []).append(sample_stats(read_jsonl(path)))
    fractions = sorted(per_step)
    return fractions, [over_seeds(per_step[f]) for f in fractions]


def study_stability(runs: Path, results: Path, summary: dict) -> str:
    """Held-out reward over training, DPO vs VAR (VAR Fig. 2)."""
    curves = {"DPO": curve(runs, f"dpo/beta{BETA:g}"), "VAR": curve(runs, f"var/beta{BETA:g}")}
    if not all(fr for fr, _ in curves.values()):
        return "## 4. Stability over training\n\n(runs missing)\n"
    summary["stability"] = {k: {f"{f:.3f}": s for f, s in zip(*v)} for k, v in curves.items()}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for name, (fractions, stats) in curves.items():
        for ax, key in zip(axes, ["score", "gold", "kl", "grammatical"]):
            errorbar(ax, fractions, stats, key, marker="o", label=name)
    labels = ["reward-model score (the paper's y-axis)", "gold reward", "KL(pi || pi_sft)",
              "grammatical fraction"]
    for ax, label in zip(axes, labels):
        ax.set_xlabel("fraction of training")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Held-out reward over training (256 test prompts, same sampling seed at every point)")
    fig.tight_layout()
    fig.savefig(results / "stability.png", dpi=110)
    fractions = sorted(set(curves["DPO"][0]) & set(curves["VAR"][0]))
    at = {name: dict(zip(*curves[name])) for name in curves}
    rows = [[f"{f:.0%}", fmt(at["DPO"][f]["score"]), fmt(at["VAR"][f]["score"]), fmt(at["DPO"][f]["gold"]),
             fmt(at["VAR"][f]["gold"]), fmt(at["DPO"][f]["kl"]), fmt(at["VAR"][f]["kl"])] for f in fractions]
    return ("## 4. Held-out reward over training, DPO vs VAR (VAR Fig. 2)\n\n![stability](stability.png)\n\n"
            + table(["training", "RM score: DPO", "RM score: VAR", "gold: DPO", "gold: VAR", "KL: DPO",
                     "KL: VAR"], rows) + f"\n\n{seeds(curves['DPO'][1][0]['seeds'])}.\n")


def study_speed(runs: Path, timings: dict) -> str:
    """Each script's own throughput log (perf/*) and wall time, over the benchmark's runs."""
    def perf(config: str, key: str) -> str:
        values = [json.loads((d / "eval.json").read_text()).get(key) for d in seed_dirs(runs, config)]
        values = [v for v in values if v is not None]
        return f"{statistics.mean(values):,.0f}" if values else "—"

    def wall(config: str) -> str:
        values = [t for k, t in timings.items() if k.startswith(config + "/seed")]
        return f"{statistics.mean(values):.0f}" if values else "—"

    base = f"dpo/beta{BETA:g}"
    other = f"dpo/beta{BETA / 2:g}"
    rows = [[f"dpo.py (β {BETA:g}, sampling 9 times)", f"{perf(base, 'perf/tokens_per_s')} tokens/s",
             wall(base)],
            [f"dpo.py (β {BETA / 2:g}, sampling once)", f"{perf(other, 'perf/tokens_per_s')} tokens/s",
             wall(other)],
            ["var.py (cross normaliser, sampling 9 times)",
             f"{perf(f'var/beta{BETA:g}', 'perf/tokens_per_s')} tokens/s in the SFT steps, "
             f"{perf(f'var/beta{BETA:g}', 'perf/tokens_per_s_with_frozen')} with the B×B frozen work",
             wall(f"var/beta{BETA:g}")],
            [f"ppo.py (β {PPO_BETAS[0]:g})", f"{perf(f'ppo/beta{PPO_BETAS[0]:g}', 'perf/episodes_per_s')}"
             " episodes/s", wall(f"ppo/beta{PPO_BETAS[0]:g}")],
            [f"dera.py ({len(LAMBDAS)} lambdas × 256 prompts)",
             f"{perf('dera', 'perf/tokens_per_s')} tokens/s decoding two models, "
             f"{perf('dera', 'perf/tokens_per_s_one_model')} one model", wall("dera")],
            [f"expo.py ({len(ALPHAS)} alphas × 128 prompts)", "—", wall(f"expo/frac{FRACTIONS[-1]:g}")]]
    return ("## Speed (2 CPU cores)\n\n"
            + table(["run", "throughput (the script's own log)", "wall s per run"], rows)
            + "\n\nWall time includes starting Python, loading, sampling and saving.\n")


def main(args: Args) -> None:
    runs, results = ROOT / args.runs_dir, ROOT / args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    timings_file = runs / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    summary = {}
    sections = [study_dera(runs, results, summary), study_expo(runs, results, summary),
                study_methods(runs, results, summary, timings), study_stability(runs, results, summary),
                study_speed(runs, timings)]
    total = sum(timings.values()) / 60
    header = (f"# Benchmark results\n\nWritten by `python benchmark/report.py` from the runs of "
              f"`python benchmark/run.py`: {len(timings)} runs, {total:.0f} minutes of compute in all.\n")
    (results / "results.md").write_text("\n".join([header, *sections]))
    (results / "summary.json").write_text(json.dumps({**summary, "timings_s": timings}, indent=1))
    print(f"wrote {results / 'results.md'} and its plots ({total:.0f} minutes of runs)")


if __name__ == "__main__":
    main(tyro.cli(Args))
