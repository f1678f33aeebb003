"""summary.json and the tables, from the runs that benchmark/run.py wrote: benchmark/results/summary.json
(every number a table shows, and the curves the plots draw), benchmark/results/results.md, and the same
tables in docs/benchmark.md between their <!-- benchmark:<name> --> markers. No matplotlib: the plots are
benchmark/plots.py's, drawn from summary.json.

    python benchmark/report.py             # summarise the runs, render the tables, update docs/benchmark.md
    python benchmark/report.py --no-docs   # leave docs/benchmark.md alone

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
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmark.run import (ALPHAS, BETA, CONVERGED_LR, EVAL_EVERY, FRACTIONS, LAMBDAS,  # noqa: E402
                           PPO_BETAS, TRAIN_PAIRS)
from toy.make import gold_reward, is_grammatical  # noqa: E402

SECTIONS = ["parts", "probes", "convergence", "dera", "expo", "methods", "stability", "stability_peak",
            "speed"]


@dataclass
class Args:
    runs_dir: str = "benchmark/runs"
    """the runs written by benchmark/run.py"""
    results_dir: str = "benchmark/results"
    """where summary.json and results.md go (and results_dir/probes/*.jsonl are read from)"""
    docs: bool = True
    """also write the tables into docs/benchmark.md (only from benchmark/runs into benchmark/results)"""


# ---------------------------------------------------------------------------------------------------
# Summarising: the runs -> summary.json (every number below comes from here)
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
            "length": sum(r["length"] for r in rows) / n, "samples": n}


def seed_dirs(runs: Path, config: str) -> list[Path]:
    """The finished seeds of one configuration, e.g. config = "dpo/beta0.1"."""
    return sorted(d for d in (runs / config).glob("seed*") if (d / "eval.json").exists())


def mean_se(values: list[float]) -> list:
    """[mean, standard error]; the error is None for a single value."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return [statistics.mean(values), se]


def over_seeds(per_seed: list[dict]) -> dict:
    """{metric: [mean, standard error]} over seeds, and the number of seeds."""
    return {**{key: mean_se([s[key] for s in per_seed]) for key in per_seed[0]}, "seeds": len(per_seed)}


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


def run_args(run: Path) -> dict:
    return json.loads((run / "args.json").read_text())


def pairs_trained(run: Path) -> int:
    """How many preference pairs a DPO run trained on, from its args.json."""
    args = run_args(run)
    split = args["train_split"]
    n = TRAIN_PAIRS if split == "train" else int(split.removeprefix("train[:").removesuffix("]"))
    return min(n, args["max_train_samples"] or n)


def eval_curve(run: Path) -> list[dict]:
    """A DPO run's held-out metrics over training: every --eval_every record, then the end of the run."""
    total = json.loads((run / "eval.json").read_text())
    points = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/loss" in r]
    end = {k: v for k, v in total.items() if k.startswith("eval/")}
    return points + [{"step": total["train/steps"], **end}]


def retrained_betas() -> list[float]:
    return [BETA / lam for lam in LAMBDAS if lam > 0]


def summarise_probes(probes: Path) -> dict | None:
    """The probes that chose study 1's schedule (results/probes/*.jsonl: the command, then the held-out
    records of one run, kept because the runs themselves are not committed)."""
    out = {}
    for path in sorted(probes.glob("*.jsonl")):
        head, *points = read_jsonl(path)
        out[path.stem] = {"command": head["command"], "steps": [p["step"] for p in points],
                          **{key: [p[f"eval/{key}"] for p in points] for key in ("loss", "rewards/margin")}}
    return out or None


def summarise_convergence(runs: Path) -> dict | None:
    """Study 1's retrained models: held-out DPO loss, margin and accuracy over training, per beta."""
    out = {}
    for beta in retrained_betas():
        dirs = seed_dirs(runs, f"dera/retrained/beta{beta:g}")
        if not dirs:
            return None
        curves = [eval_curve(d) for d in dirs]
        curve = {"steps": [p["step"] for p in curves[0]], "seeds": len(curves),
                 "held_out_pairs": run_args(dirs[0])["max_eval_samples"] or 512,  # the toy's test split
                 "pairs": pairs_trained(dirs[0])}
        for key in ("loss", "rewards/margin", "rewards/accuracy"):
            curve[key] = [mean_se([c[i][f"eval/{key}"] for c in curves]) for i in range(len(curve["steps"]))]
        out[f"{beta:g}"] = curve
    return out


def summarise_dera(runs: Path) -> dict | None:
    """DeRa at lambda against DPO retrained at beta / lambda (DeRa Sec. 5.2, Fig. 2)."""
    dera = {lam: config_stats(runs, "dera/realigned", where=("lambda", f"{lam:g}")) for lam in LAMBDAS}
    retrained = {lam: config_stats(runs, f"dera/retrained/beta{BETA / lam:g}") if lam > 0 else dera[0.0]
                 for lam in LAMBDAS}  # lambda 0: beta infinite, the SFT model itself
    if any(v is None for v in [*dera.values(), *retrained.values()]):
        return None
    return {"beta": BETA, "lambdas": {f"{lam:g}": {"dera": dera[lam], "retrained": retrained[lam]}
                                      for lam in LAMBDAS}}


def summarise_expo(runs: Path) -> dict | None:
    """DPO trained on fractions of the pairs, each extrapolated (ExPO Table 2, Fig. 6)."""
    out = {}
    for f in FRACTIONS:
        by_alpha = {a: config_stats(runs, f"expo/frac{f:g}", where=("alpha", a)) for a in ALPHAS}
        if any(s is None for s in by_alpha.values()):
            return None
        # the paper's procedure: the reward model picks alpha on the dev prompts (per seed), gold judges it
        alphas, chosen = [], []
        for d in seed_dirs(runs, f"expo/frac{f:g}"):
            alphas.append(json.loads((d / "eval.json").read_text())["best_alpha"])
            samples = read_jsonl(d / "samples.jsonl")
            chosen.append(sample_stats([r for r in samples if r["alpha"] == alphas[-1]]))
        # the oracle: the alpha with the best mean usable gold, which no method could know
        oracle = max(ALPHAS, key=lambda a: by_alpha[a]["usable"][0])
        aligned = Path(run_args(seed_dirs(runs, f"expo/frac{f:g}")[0])["aligned"])
        out[f"{f:g}"] = {"pairs": pairs_trained(aligned if aligned.is_absolute() else ROOT / aligned),
                         "by_alpha": {f"{a:g}": by_alpha[a] for a in ALPHAS},
                         "rm_alphas": alphas, "rm_selected": over_seeds(chosen), "oracle_alpha": oracle,
                         "oracle_gain": by_alpha[oracle]["usable"][0] - by_alpha[0.0]["usable"][0]}
    return out


def seconds_per_run(timings: dict, config: str) -> float | None:
    values = [t["seconds"] for k, t in timings.items() if re.fullmatch(re.escape(config) + r"/seed\d+", k)]
    return statistics.mean(values) if values else None


def summarise_methods(runs: Path, timings: dict) -> dict | None:
    """PPO vs DPO vs VAR from one SFT model (Tulu 2.5 Table 2); the plot's frontier adds study 1's DPO
    across beta and DeRa across lambda."""
    var_runs = seed_dirs(runs, "var/default")
    if not var_runs:
        return None
    configs = [("SFT (toy/sft)", "sft", "dera/realigned", ("lambda", "0")),
               (f"DPO, β {BETA:g}", "dpo", f"dpo/beta{BETA:g}", None),
               (f"VAR, β {run_args(var_runs[0])['beta']:g} (its default)", "var", "var/default", None)]
    configs += [(f"PPO, β {b:g}", "ppo", f"ppo/beta{b:g}", None) for b in PPO_BETAS]
    rows = {}
    for name, family, config, where in configs:
        stats = config_stats(runs, config, where=where)
        if stats is None:
            return None
        seconds = None if where else seconds_per_run(timings, config)
        rows[name] = {**stats, "family": family, "minutes": seconds and seconds / 60}
    return rows


def training_curve(run: Path) -> list[tuple[float, dict]]:
    """(fraction of training, sample_stats) at every --sample_every point of one run, and at its end."""
    total = json.loads((run / "eval.json").read_text())["train/steps"]
    files = [(int(p.stem.split("_")[1]), p) for p in (run / "samples").glob("step_*.jsonl")]
    return sorted((step / total, sample_stats(read_jsonl(path)))
                  for step, path in files + [(total, run / "samples.jsonl")])


def summarise_stability(runs: Path) -> dict | None:
    """Held-out reward over LONGER x the default training, DPO vs VAR (VAR Fig. 2), and per method the
    fall from each seed's best point to its last (score, gold and usable gold)."""
    out = {}
    for name in ("dpo", "var"):
        curves = [training_curve(d) for d in seed_dirs(runs, f"stability/{name}")]
        if not curves:
            return None
        falls = [{f"{key}_fall": max(s[key] for _, s in c) - c[-1][1][key]
                  for key in ("score", "gold", "usable")} for c in curves]
        out[name.upper()] = {"fractions": [f for f, _ in curves[0]],
                             "points": [over_seeds([c[i][1] for c in curves]) for i in range(len(curves[0]))],
                             "peak_to_final": over_seeds(falls)}
    return out


def summarise_speed(runs: Path, timings: dict) -> dict:
    """Each script's own throughput log (perf/*, mean over seeds) and the mean wall time of its runs."""
    def perf(config: str, key: str) -> float | None:
        values = [json.loads((d / "eval.json").read_text()).get(key) for d in seed_dirs(runs, config)]
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    tokens = [("perf/tokens_per_s", "tokens/s")]
    rows = [(f"dpo.py (β {BETA:g}, the default run, sampling 9 times)", f"dpo/beta{BETA:g}", tokens),
            (f"dpo.py (study 1: {TRAIN_PAIRS:,} pairs at lr {CONVERGED_LR:g}, held-out eval every "
             f"{EVAL_EVERY} steps)", f"dera/retrained/beta{BETA:g}", tokens),
            ("var.py (the default run, sampling 9 times)", "var/default",
             [("perf/tokens_per_s", "tokens/s in the SFT steps"),
              ("perf/tokens_per_s_with_frozen", "with the B×B frozen work")]),
            (f"ppo.py (β {PPO_BETAS[0]:g})", f"ppo/beta{PPO_BETAS[0]:g}",
             [("perf/episodes_per_s", "episodes/s")]),
            (f"dera.py ({len(LAMBDAS)} lambdas × 256 prompts)", "dera/realigned",
             [("perf/tokens_per_s", "tokens/s decoding two models"),
              ("perf/tokens_per_s_one_model", "one model")]),
            (f"expo.py ({len(ALPHAS)} alphas × 128 prompts)", f"expo/frac{FRACTIONS[-1]:g}", [])]
    return {name: {"throughput": [[perf(config, key), unit] for key, unit in keys],
                   "wall_s": seconds_per_run(timings, config)} for name, config, keys in rows}


def summarise(runs: Path, timings: dict, probes: Path) -> dict:
    """Everything the tables and plots show; a study whose runs are missing is None."""
    quick = runs == ROOT / "benchmark/runs-quick"
    return {"command": "python benchmark/run.py" + (" --quick" if quick else ""), "runs": len(timings),
            "minutes": sum(t["seconds"] for t in timings.values()) / 60,
            "probes": summarise_probes(probes), "convergence": summarise_convergence(runs),
            "dera": summarise_dera(runs), "expo": summarise_expo(runs),
            "methods": summarise_methods(runs, timings),
            "stability": summarise_stability(runs), "speed": summarise_speed(runs, timings),
            "timings_s": {k: t["seconds"] for k, t in timings.items()}}


# ---------------------------------------------------------------------------------------------------
# Rendering: summary.json -> markdown tables (pure functions of the summary: the test re-renders them)
# ---------------------------------------------------------------------------------------------------
def fmt(stat, digits: int = 2, percent: bool = False) -> str:
    mean, se = stat
    scale, unit = (100, "%") if percent else (1, "")
    if se is None:
        return f"{scale * mean:.{digits}f}{unit}"
    return f"{scale * mean:.{digits}f} ± {scale * se:.{digits}f}{unit}"


def seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n > 1 else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def quarters(steps: list) -> list[int]:
    """Indices of the evaluation points nearest to 25, 50, 75 and 100% of training."""
    return [min(range(len(steps)), key=lambda i: abs(steps[i] - f * steps[-1])) for f in (0.25, 0.5, 0.75, 1)]


def render_probes(p: dict) -> str:
    rows = []
    for probe in p.values():
        idx = quarters(probe["steps"])
        rows.append([f"`{probe['command']}`", str(probe["steps"][-1]),
                     " → ".join(f"{probe['loss'][i]:.3f}" for i in idx),
                     " → ".join(f"{probe['rewards/margin'][i]:.2f}" for i in idx)])
    return table(["probe (seed 0)", "steps", "held-out loss at 25, 50, 75, 100%",
                  "held-out margin, same points"], rows)


def render_convergence(c: dict) -> str:
    rows = []
    for beta, curve in c.items():
        idx = quarters(curve["steps"])
        rows.append([beta, str(curve["steps"][-1]), *[fmt(curve["loss"][i], 3) for i in idx],
                     *[fmt(curve["rewards/margin"][i], 2) for i in idx[1:]],
                     fmt(curve["rewards/accuracy"][idx[-1]], 0, True)])
    first = next(iter(c.values()))
    return (table(["β", "steps", "held-out loss at 25%", "50%", "75%", "100%", "held-out margin at 50%",
                   "75%", "100%", "held-out accuracy"], rows)
            + f"\n\n{seeds(first['seeds'])}; {first['pairs']:,} training pairs, {first['held_out_pairs']} "
              "held-out pairs; the margin is β·h, the gap between chosen and rejected implicit rewards.")


def render_dera(d: dict) -> str:
    rows = []
    for lam, s in d["lambdas"].items():
        dera, ret = s["dera"], s["retrained"]
        rows.append([lam, "∞ (SFT)" if lam == "0" else f"{d['beta'] / float(lam):g}", fmt(dera["gold"]),
                     fmt(ret["gold"]), fmt(dera["usable"]), fmt(ret["usable"]), fmt(dera["kl"]),
                     fmt(ret["kl"]), fmt(dera["grammatical"], 0, True), fmt(ret["grammatical"], 0, True)])
    sft = d["lambdas"]["0"]["dera"]
    return (table(["λ", "β/λ", "gold: DeRa", "gold: retrained", "usable gold: DeRa", "usable gold: retrained",
                   "KL: DeRa", "KL: retrained", "grammatical: DeRa", "grammatical: retrained"], rows)
            + f"\n\n{seeds(sft['seeds'])}; {sft['samples'][0]:.0f} test prompts per seed; temperature 1.")


def render_expo(e: dict) -> str:
    rows = []
    for f, s in e.items():
        zero, oracle, picked = s["by_alpha"]["0"], s["by_alpha"][f"{s['oracle_alpha']:g}"], s["rm_selected"]
        rows.append([f"{float(f):.0%} ({s['pairs']} pairs)", fmt(zero["usable"]),
                     ", ".join(f"{a:g}" for a in s["rm_alphas"]), fmt(picked["gold"]), fmt(picked["usable"]),
                     fmt(picked["grammatical"], 0, True), f"{s['oracle_alpha']:g}", fmt(oracle["usable"]),
                     f"{s['oracle_gain']:+.2f}"])
    zero = next(iter(e.values()))["by_alpha"]["0"]
    return (table(["DPO data", "usable gold at α = 0", "α picked by the RM (per seed)", "gold at picked α",
                   "usable gold at picked α", "grammatical at picked α", "best α by usable gold (oracle)",
                   "its usable gold", "gain over α = 0"], rows)
            + f"\n\n{seeds(zero['seeds'])}; {zero['samples'][0]:.0f} validation prompts per seed; "
              "temperature 1.")


def render_methods(m: dict) -> str:
    rows = [[name, fmt(s["gold"]), fmt(s["usable"]), fmt(s["kl"]), fmt(s["grammatical"], 0, True),
             fmt(s["score"]), f"{s['length'][0]:.1f}", "—" if s["minutes"] is None else f"{s['minutes']:.1f}"]
            for name, s in m.items()]
    first = next(iter(m.values()))
    return (table(["method", "gold", "usable gold", "KL to SFT", "grammatical", "RM score", "length (tokens)",
                   "minutes per run"], rows)
            + f"\n\n{seeds(first['seeds'])}; {first['samples'][0]:.0f} test prompts per seed; every method "
              "sampled at temperature 1 (PPO also trained at 1).")


def render_stability(s: dict) -> str:
    dpo, var = s["DPO"], s["VAR"]
    assert dpo["fractions"] == var["fractions"], "DPO and VAR were sampled at different points"
    rows = [[f"{f:.0%}", fmt(a["score"]), fmt(b["score"]), fmt(a["gold"]), fmt(b["gold"]), fmt(a["usable"]),
             fmt(b["usable"]), fmt(a["kl"]), fmt(b["kl"]), fmt(a["grammatical"], 0, True),
             fmt(b["grammatical"], 0, True)]
            for f, a, b in zip(dpo["fractions"], dpo["points"], var["points"])]
    first = dpo["points"][0]
    return (table(["training", "RM score: DPO", "RM score: VAR", "gold: DPO", "gold: VAR",
                   "usable gold: DPO", "usable gold: VAR", "KL: DPO", "KL: VAR", "grammatical: DPO",
                   "grammatical: VAR"], rows)
            + f"\n\n{seeds(first['seeds'])}; {first['samples'][0]:.0f} test prompts, the same sampling seed "
              "at every point.")


def render_stability_peak(s: dict) -> str:
    rows = [[name, *[fmt(v["peak_to_final"][f"{key}_fall"]) for key in ("score", "gold", "usable")]]
            for name, v in s.items()]
    points = len(s["DPO"]["fractions"])
    return table(["method", "RM score: best point − last", "gold: best − last", "usable gold: best − last"],
                 rows) + (
        f"\n\nPer seed, the best of the {points} points minus the last one (0: the run ends at its best).")


def render_speed(sp: dict) -> str:
    rows = []
    for name, s in sp.items():
        parts = [f"{v:,.0f} {unit}" for v, unit in s["throughput"] if v is not None]
        rows.append([name, ", ".join(parts) or "—", "—" if s["wall_s"] is None else f"{s['wall_s']:.0f}"])
    return (table(["run", "throughput (the script's own log)", "wall s per run"], rows)
            + "\n\nWall time includes starting Python, loading, sampling and saving.")


PARTS = [("study 1", "dera", ("dera/",)),
         ("studies 2 and 3 (3 reuses study 1's runs)", "expo methods", ("dpo/", "expo/", "var/", "ppo/")),
         ("study 4", "stability", ("stability/",))]


def render_parts(summary: dict) -> str:
    """The full run's resumable parts, with the runs and minutes timings.json measured for each."""
    rows, timings, command = [], summary["timings_s"], summary["command"]
    for name, studies, prefixes in PARTS:
        seconds = [t for run, t in timings.items() if run.startswith(prefixes)]
        rows.append([name, f"`{command} --studies {studies}`", str(len(seconds)), f"{sum(seconds) / 60:.0f}"])
    rows.append(["all", f"`{command}`", str(len(timings)), f"{sum(timings.values()) / 60:.0f}"])
    return table(["part", "command", "runs", "minutes"], rows)


def render(summary: dict) -> dict[str, str]:
    """Each section's markdown (table and footnote), or a line saying its runs are missing."""
    sources = {"parts": (None, render_parts), "probes": ("probes", render_probes),
               "convergence": ("convergence", render_convergence),
               "dera": ("dera", render_dera), "expo": ("expo", render_expo),
               "methods": ("methods", render_methods),
               "stability": ("stability", render_stability),
               "stability_peak": ("stability", render_stability_peak), "speed": ("speed", render_speed)}
    return {name: fn(summary) if key is None else "(runs missing)" if summary.get(key) is None
            else fn(summary[key]) for name, (key, fn) in sources.items()}


def block(name: str, text: str) -> str:
    return f"<!-- benchmark:{name} -->\n{text}\n<!-- /benchmark:{name} -->\n"


def results_md(summary: dict) -> str:
    """benchmark/results/results.md: every table, under its study's plot."""
    t = render(summary)
    return "\n".join([
        "# Benchmark results\n",
        f"Written by `python benchmark/report.py` from the runs of `python benchmark/run.py`: "
        f"{summary['runs']} runs, {summary['minutes']:.0f} minutes of compute in all (2 CPU cores, one "
        "run at a time). The readings are in [docs/benchmark.md](../../docs/benchmark.md).\n",
        block("parts", t["parts"]),
        "## 1. DeRa vs DPO retrained to convergence (DeRa Fig. 2)\n", block("probes", t["probes"]),
        "![convergence](convergence.png)\n", block("convergence", t["convergence"]), "![DeRa](dera.png)\n",
        block("dera", t["dera"]),
        "## 2. ExPO on under-trained DPO models (ExPO Table 2, Fig. 6)\n", "![ExPO](expo.png)\n",
        block("expo", t["expo"]),
        "## 3. PPO vs DPO vs VAR from the same SFT model (Tulu 2.5 Table 2; DPO Fig. 2)\n",
        "![methods](methods.png)\n", block("methods", t["methods"]),
        "## 4. Held-out reward over 4x the default training, DPO vs VAR (VAR Fig. 2)\n",
        "![stability](stability.png)\n", block("stability", t["stability"]),
        block("stability_peak", t["stability_peak"]),
        "## Speed (2 CPU cores)\n", block("speed", t["speed"])])


def blocks(text: str, kind: str = "benchmark") -> dict[str, str]:
    """The <!-- <kind>:<name> --> ... <!-- /<kind>:<name> --> blocks of a markdown file (docs/render.py's
    tables are kind "table")."""
    return dict(re.findall(rf"<!-- {kind}:(\w+) -->\n(?:(.*?)\n)?<!-- /{kind}:\1 -->", text, flags=re.S))


def fill_blocks(text: str, tables: dict[str, str], kind: str = "benchmark") -> str:
    """`text` with each of its blocks replaced by the table of that name."""
    return re.sub(rf"(<!-- {kind}:(\w+) -->\n)(?:.*?\n)?(<!-- /{kind}:\2 -->)",
                  lambda m: m.group(1) + tables[m.group(2)] + "\n" + m.group(3), text, flags=re.S)


def main(args: Args) -> None:
    runs, results = ROOT / args.runs_dir, ROOT / args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    timings_file = runs / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    summary = summarise(runs, timings, results / "probes")
    (results / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    (results / "results.md").write_text(results_md(summary))
    committed = runs == ROOT / "benchmark/runs" and results == ROOT / "benchmark/results"
    if args.docs and committed:
        page = ROOT / "docs" / "benchmark.md"
        page.write_text(fill_blocks(page.read_text(), render(summary)))
    pages = " and docs/benchmark.md's tables" if args.docs and committed else ""
    print(f"wrote {results / 'summary.json'} and {results / 'results.md'}{pages} ({summary['runs']} runs, "
          f"{summary['minutes']:.0f} minutes)")


if __name__ == "__main__":
    main(tyro.cli(Args))
