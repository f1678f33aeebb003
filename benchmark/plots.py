"""The benchmark's plots, drawn from summary.json alone (benchmark/report.py writes it from the runs):
convergence.png, dera.png, expo.png, methods.png and stability.png next to it.

    pip install -r benchmark/requirements.txt   # matplotlib
    python benchmark/plots.py
"""

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    results_dir: str = "benchmark/results"
    """where summary.json is and the plots go"""


def errorbar(ax, xs, stats, key, **kw):
    """Means with standard-error bars (none with a single seed)."""
    ax.errorbar(xs, [s[key][0] for s in stats], yerr=[s[key][1] or 0 for s in stats], capsize=3, **kw)


def finish(fig, axes, title: str, path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_convergence(c: dict, probes: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for beta, curve in c.items():
        for ax, key in zip(axes, ["loss", "rewards/margin", "rewards/accuracy"]):
            ax.errorbar(curve["steps"], [m for m, _ in curve[key]], yerr=[s or 0 for _, s in curve[key]],
                        marker=".", capsize=2, label=f"beta {beta}")
    for (name, probe), style in zip(probes.items(), [":", "-."]):  # the probes that chose the schedule
        for ax, key in zip(axes, ["loss", "rewards/margin"]):
            ax.plot(probe["steps"], probe[key], style, color="gray", label=f"probe {name}")
    for ax, label in zip(axes, ["held-out DPO loss", "held-out margin beta * h", "held-out accuracy"]):
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    finish(fig, axes, "Study 1's retrained DPO models: held-out metrics over training", path)


def plot_dera(d: dict, path: Path) -> None:
    lambdas, stats = [float(lam) for lam in d["lambdas"]], list(d["lambdas"].values())
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, label in zip(axes, ["gold", "usable", "kl", "grammatical"],
                              ["gold reward", "usable gold (grammatical responses)", "KL(pi || pi_sft)",
                               "grammatical fraction"]):
        errorbar(ax, lambdas, [s["dera"] for s in stats], key, marker="s", label="DeRa at lambda")
        errorbar(ax, lambdas, [s["retrained"] for s in stats], key, marker="^", linestyle="--",
                 label="DPO retrained at beta / lambda")
        ax.set_xlabel(f"lambda (retrained at beta = {d['beta']:g} / lambda)")
        ax.set_ylabel(label)
    axes[2].set_yscale("symlog", linthresh=1)
    axes[0].legend(fontsize=8)
    finish(fig, axes, f"DeRa realigns converged DPO (beta {d['beta']:g}) at decoding time: does it predict "
                      "retraining?", path)


def plot_expo(e: dict, path: Path) -> None:
    alphas = [float(a) for a in next(iter(e.values()))["by_alpha"]]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for f, s in e.items():
        for ax, key in zip(axes, ["usable", "gold", "score", "grammatical"]):
            errorbar(ax, alphas, list(s["by_alpha"].values()), key, marker="o",
                     label=f"DPO on {float(f):.0%} of the pairs")
    axes[1].set_yscale("symlog", linthresh=10)
    labels = ["usable gold (grammatical responses)", "gold reward", "reward-model score (selects alpha)",
              "grammatical fraction"]
    for ax, label in zip(axes, labels):
        ax.set_xscale("symlog", linthresh=0.25)
        ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
        ax.set_xlabel("alpha (theta_dpo + alpha (theta_dpo - theta_sft))")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    finish(fig, axes, "ExPO: extrapolating DPO models trained on less data", path)


def plot_methods(m: dict, d: dict | None, path: Path) -> None:
    """Every configuration's (KL, gold), and study 1's converged DPO across beta and DeRa across lambda."""
    styles = {"sft": "k+", "dpo": "o", "var": "*", "ppo": "D-"}
    families = []  # (label, points, style)
    for name, s in m.items():
        if s["family"] != "ppo":
            families.append((name, [s], styles[s["family"]]))
    families.append(("PPO across β", [s for s in m.values() if s["family"] == "ppo"], styles["ppo"]))
    if d:
        retrained = [s["retrained"] for s in d["lambdas"].values()]
        families.append(("DPO to convergence across β", retrained, "^-"))
        families.append(("DeRa across λ", [s["dera"] for s in d["lambdas"].values()], "s:"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key in zip(axes, ["gold", "usable"]):
        for label, points, style in families:
            points = sorted(points, key=lambda p: p["kl"][0])
            ax.errorbar([p["kl"][0] for p in points], [p[key][0] for p in points],
                        xerr=[p["kl"][1] or 0 for p in points], yerr=[p[key][1] or 0 for p in points],
                        fmt=style, capsize=3, label=label, markersize=8)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("KL(pi || pi_sft) of the samples (nats)")
    axes[0].set_yscale("symlog", linthresh=10)
    axes[0].set_ylabel("gold reward")
    axes[1].set_ylabel("usable gold (grammatical responses)")
    axes[0].legend(fontsize=8)
    finish(fig, axes, "Reward against KL to the SFT model, every method sampled at temperature 1", path)


def plot_stability(s: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    for name, curve in s.items():
        for ax, key in zip(axes, ["score", "gold", "usable", "kl", "grammatical"]):
            errorbar(ax, curve["fractions"], curve["points"], key, marker="o", label=name)
    labels = ["reward-model score (the paper's y-axis)", "gold reward", "usable gold (grammatical responses)",
              "KL(pi || pi_sft)", "grammatical fraction"]
    for ax, label in zip(axes, labels):
        ax.set_xlabel("fraction of training (4x the default length)")
        ax.set_ylabel(label)
    axes[0].legend()
    n = s["DPO"]["points"][0]["samples"][0]
    finish(fig, axes, f"Held-out reward over training ({n:.0f} test prompts, the same sampling seed at every "
                      "point)", path)


def main(args: Args) -> None:
    results = ROOT / args.results_dir
    summary = json.loads((results / "summary.json").read_text())
    drawn = []
    if summary.get("convergence"):
        plot_convergence(summary["convergence"], summary.get("probes") or {}, results / "convergence.png")
        drawn.append("convergence")
    for name, fn in [("dera", plot_dera), ("expo", plot_expo), ("stability", plot_stability)]:
        if summary.get(name):
            fn(summary[name], results / f"{name}.png")
            drawn.append(name)
    if summary.get("methods"):
        plot_methods(summary["methods"], summary.get("dera"), results / "methods.png")
        drawn.append("methods")
    print(f"drew {', '.join(f'{n}.png' for n in drawn)} in {results}")


if __name__ == "__main__":
    main(tyro.cli(Args))
