"""Every table of numbers in README.md and docs/*.md, rendered from the committed JSON it comes from.

    python docs/render.py                        # re-render every table in place
    python docs/render.py --toy_runs DIR         # first summarise the toy's default runs DIR/<script>/
                                                 # (DIR/times.txt: their wall times) into docs/results/toy.json
    python docs/render.py --toy_runs DIR --extra "DIR2/dera-weights=DeRa, weights mode"  # and a variant

A table sits between <!-- table:<name> --> and <!-- /table:<name> -->; tests/test_docs.py re-renders every
one from its JSON and compares. The benchmark's tables (<!-- benchmark:<name> --> in docs/benchmark.md) are
benchmark/report.py's, from benchmark/results/summary.json. Sources:
  toy, toy_more, toy_<sweep>     docs/results/toy.json: eval.json, args.json and samples.jsonl of each toy
                                 run; gold reward and grammar are toy/make.py's, computed on the samples
  speed_trl                      benchmark/results/speed{,-smollm-shape}{,-before}.json
  speed_ppo, speed_dpo_length, speed_var_batch   benchmark/results/speed.json
  speed_bf16                     benchmark/results/speed-smollm-shape{,-dpo512}-{fp32,bf16}.json
  memory                         docs/results/memory.json (arithmetic: bytes per parameter)
"""

import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmark.report import blocks, fill_blocks, table  # noqa: E402
from toy.make import gold_reward, is_grammatical  # noqa: E402

PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
TOY_JSON = ROOT / "docs/results/toy.json"
SPEED = ROOT / "benchmark/results"
# the toy's default runs, in the order the pipeline makes them, and their labels; --extra adds variants
TOY_RUNS = {"sft": "pi_sft", "reward_model": "reward model", "dpo": "DPO", "var": "VAR", "ppo": "PPO",
            "dera": "DeRa", "expo": "ExPO"}


@dataclass
class Args:
    toy_runs: Optional[str] = None
    """a folder of the toy's default runs (DIR/sft, DIR/dpo, ...) to summarise into docs/results/toy.json"""
    extra: tuple[str, ...] = ()
    """variant runs to add, as folder=label (the folder relative to toy_runs, or absolute)"""


# ---------------------------------------------------------------------------------------------------
# Summarising: the toy's runs -> docs/results/toy.json
# ---------------------------------------------------------------------------------------------------
def mean_se(values: list) -> list:
    n = len(values)
    mean = sum(values) / n
    return [mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None]


def sample_stats(rows: list) -> dict:
    """Gold reward, usable gold (gold when grammatical, else 0), grammaticality and what the script logged."""
    gold = [gold_reward(r["prompt"][-1]["content"], r["response"]) for r in rows]
    ok = [is_grammatical(r["response"]) for r in rows]
    out = {"n": len(rows), "gold": mean_se(gold), "usable": mean_se([g * o for g, o in zip(gold, ok)]),
           "grammatical": sum(ok) / len(rows)}
    if "logratio" in rows[0]:
        out["kl"] = sum(r["logratio"] for r in rows) / len(rows)
    if rows[0].get("score") is not None:
        out["score"] = mean_se([r["score"] for r in rows])
    return out


def wall_times(run: Path) -> Optional[int]:
    """The run's line in times.txt next to it: `<folder name> rc=0 <seconds>s`, one per finished run."""
    path = run.parent / "times.txt"
    for words in (line.split() for line in path.read_text().splitlines()) if path.exists() else []:
        if len(words) == 3 and words[0] == run.name and words[1] == "rc=0":
            return int(words[2].rstrip("s"))
    return None


def summarise_run(run: Path) -> dict:
    args = json.loads((run / "args.json").read_text())
    words = [w for w in shlex.split(args["run"]["command"]) if w != "--overwrite"]
    if "--output_dir" in words:  # where it ran is not part of the command a reader types
        i = words.index("--output_dir")
        del words[i : i + 2]
    evals = json.loads((run / "eval.json").read_text())
    samples = []
    if (run / "samples.jsonl").exists():
        samples = [json.loads(line) for line in open(run / "samples.jsonl")]
    split = args.get("eval_prompts_split") or args.get("prompts_split") or args.get("eval_split")
    out = {"command": shlex.join(["python", *words]), "wall_s": wall_times(run),
           "git_commit": args["run"]["git_commit"], "prompts_split": split,
           "temperature": args.get("eval_temperature") or args.get("temperature"),
           # KL to the reference (ref, else the starting model); ExPO's to the aligned model it extrapolates
           "kl_to": args["aligned"] if "alphas" in args else args.get("ref") or args.get("model"),
           "eval": {k: v for k, v in evals.items() if k != "table"}}
    for column in ("lambda", "alpha"):  # a sweep: one row per value, from its own samples
        if column in evals.get("table", [{}])[0]:
            out["sweep"] = column
            out["rows"] = [{**row, **sample_stats([s for s in samples if s[column] == row[column]])}
                           for row in evals["table"]]
            return out
    if samples:
        out["samples"] = sample_stats(samples)
    return out


def summarise_toy(runs: Path, extra: dict) -> dict:
    """toy.json: the default runs DIR/<script>, then the extra runs (folder: label; relative to DIR)."""
    stats = json.loads((ROOT / "toy/data/stats.json").read_text())
    return {"source": "each script's default run (no argument but --output_dir) and the extra runs, "
                      "summarised by `python docs/render.py --toy_runs DIR`; wall times from the times.txt "
                      "next to each run",
            "bayes_accuracy": stats["prefs/test"]["bayes_accuracy"],
            "runs": {Path(name).name: {"label": label, **summarise_run(runs / name)}
                     for name, label in {**TOY_RUNS, **extra}.items()}}


# ---------------------------------------------------------------------------------------------------
# Rendering: JSON -> markdown tables (pure functions: tests/test_docs.py re-renders them)
# ---------------------------------------------------------------------------------------------------
def pm(stat: list, digits: int = 2) -> str:
    mean, se = stat
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"


def pct(x: float, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f}%"


def minutes(seconds: Optional[float]) -> str:
    return "—" if seconds is None else f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def held_out(run: dict, toy: dict) -> str:
    """The one held-out number each trainer's eval.json reports."""
    e = run["eval"]
    if "eval/accuracy" in e:  # the reward model's pairwise accuracy
        return f"pair accuracy {pct(e['eval/accuracy'], 1)} (Bayes {pct(toy['bayes_accuracy'], 1)})"
    if "eval/rewards/accuracy" in e:  # DPO's implicit reward
        return f"pair accuracy {pct(e['eval/rewards/accuracy'], 1)}"
    if "eval/loss" in e:
        return f"loss {e['eval/loss']:.3f}"
    return "—"


def render_toy(toy: dict, names: list) -> str:
    """Runs that are not sweeps: what each held out, then its samples against the gold reward."""
    rows = []
    for name in names:
        run = toy["runs"][name]
        s = run.get("samples")
        cells = ["—"] * 6
        if s:
            cells = [f"{s['n']} {run['prompts_split']}, T = {run['temperature']:g}", pm(s["gold"]),
                     pm(s["usable"]), pct(s["grammatical"]), f"{s['kl']:.2f}" if "kl" in s else "—",
                     pm(s["score"]) if "score" in s else "—"]
        rows.append([run["label"], f"`{run['command']}`", minutes(run["wall_s"]), held_out(run, toy), *cells])
    return (table(["run", "command", "wall time", "held out", "samples", "gold", "usable gold", "grammatical",
                   "KL to toy/sft", "RM score"], rows)
            + "\n\nOne run each (seed 0), one at a time on 2 CPU cores; ± is the standard error over the "
              "samples.")


def render_sweep(run: dict) -> str:
    """DeRa's lambdas or ExPO's alphas: one row per value, each from its own samples."""
    symbol = {"lambda": "λ", "alpha": "α"}[run["sweep"]]
    rows = [[f"{float(r[run['sweep']]):g}", pm(r["score"]), pm(r["gold"]), pm(r["usable"]),
             pct(r["grammatical"]), f"{r['eval/kl']:.2f}"] for r in run["rows"]]
    best = run["eval"].get("best_alpha")
    picked = "" if best is None else f" The reward model picks α = {best:g}."
    wall = "" if run["wall_s"] is None else f", {minutes(run['wall_s'])} wall (2 CPU cores)"
    return (table([symbol, "RM score", "gold", "usable gold", "grammatical", f"KL to {run['kl_to']}"], rows)
            + f"\n\n`{run['command']}`: {run['rows'][0]['n']} {run['prompts_split']} prompts, "
              f"T = {run['temperature']:g}{wall}.{picked}")


def ratio(r: list, bold: bool = False) -> str:
    """A [min, median, max] ratio as "median (min-max)"."""
    lo, mid, hi = r
    median = f"**{mid:.2f}x**" if bold else f"{mid:.2f}x"
    return f"{median} ({lo:.2f}-{hi:.2f})"


def render_speed_trl(files: dict) -> str:
    names = {"sft": "SFT", "reward_model": "reward model", "dpo": "DPO"}
    cols = ["speed-smollm-shape-before", "speed-smollm-shape", "speed-before", "speed"]
    rows = [[label, *[ratio(files[c]["trainers"][m]["ratio"], bold=c == "speed-smollm-shape") for c in cols]]
            for m, label in names.items()]
    return table(["TRL step time / minialign's", "135M shape, before", "135M shape, now", "toy, before",
                  "toy, now"], rows)


def render_speed_ppo(speed: dict) -> str:
    p = speed["ppo"]
    names = {"rollout": f"rollout: generate, {p['batch']} prompts x {p['response_len']} tokens",
             "forwards": "no-grad forwards: reward, old policy, reference, value",
             "update": "update: policy + value forward, backward, step"}
    rows = [[names[k], f"{1000 * r['s']:.1f}", f"{1000 * r['floor_s']:.1f}", ratio(r["ratio"])]
            for k, r in p["phases"].items()]
    return table(["PPO phase (toy)", "minialign ms", "floor ms", "phase / floor, median (min-max)"], rows)


def render_speed_dpo_length(speed: dict) -> str:
    rows = speed["dpo_length"]
    per_token = rows[0]["minialign_step_s"] / rows[0]["tokens_per_step"]
    return table(["DPO max_length (toy)", "tokens/step", "minialign ms/step", "per token vs the first",
                  "TRL / minialign"],
                 [[str(r["max_length"]), f"{r['tokens_per_step']:.0f}", f"{1000 * r['minialign_step_s']:.1f}",
                   f"{r['minialign_step_s'] / r['tokens_per_step'] / per_token:.2f}x",
                   f"{r['ratio'][1]:.2f}x"] for r in rows])


def render_speed_var_batch(speed: dict) -> str:
    rows = speed["var_batch"]
    return table(["VAR batch B (toy)", "groups", "scored sequences", "frozen s", "ms per example",
                  "ms per scored sequence"],
                 [[str(r["batch_size"]), str(r["groups"]), str(r["scored"]), f"{r['frozen_s']:.2f}",
                   f"{1000 * r['frozen_s'] / r['examples']:.1f}", f"{1000 * r['frozen_s'] / r['scored']:.2f}"]
                  for r in rows])


def render_speed_bf16(files: dict) -> str:
    """The 135M shape's steps, both sides, in fp32 and in bf16."""
    def step_s(stem: str, dtype: str, method: str, side: str) -> tuple:
        f = files[f"{stem}-{dtype}"]
        r = f["dpo_length"][0] if method == "dpo512" else f["trainers"][method]
        return r[f"{side}_step_s"], r["tokens_per_step"]

    rows = []
    for label, method, stem in [("SFT, toy rows", "sft", "speed-smollm-shape"),
                                ("reward model, toy rows", "reward_model", "speed-smollm-shape"),
                                ("DPO, toy rows", "dpo", "speed-smollm-shape"),
                                ("DPO, 512-token rows", "dpo512", "speed-smollm-shape-dpo512")]:
        (m32, tokens), (m16, _) = (step_s(stem, d, method, "minialign") for d in ("fp32", "bf16"))
        (t32, _), (t16, _) = (step_s(stem, d, method, "trl") for d in ("fp32", "bf16"))
        rows.append([f"{label} ({tokens:,.0f} tokens)", f"{1000 * m32:,.0f} ms", f"{1000 * m16:,.0f} ms",
                     f"{m32 / m16:.2f}x", f"{1000 * t32:,.0f} ms", f"{1000 * t16:,.0f} ms"])
    return table(["step (135M shape)", "minialign fp32", "minialign bf16", "bf16 speed-up", "TRL fp32",
                  "TRL bf16"], rows)


def render_memory(m: dict) -> str:
    b = m["bytes_per_param"]
    rows = []
    for r in m["rows"]:
        terms = [str(b["trained"])] * r["trained"] + [str(b["frozen"])] * r["frozen"]
        per_param = b["trained"] * r["trained"] + b["frozen"] * r["frozen"]
        rows.append([r["label"], " + ".join(terms),
                     *[f"{per_param * s['params_b'] / s['gpus']:g} GB" for s in m["sizes"]]])
    sizes = [f"{s['params_b']:g}B, " + ("1 GPU" if s["gpus"] == 1 else f"N = {s['gpus']}")
             for s in m["sizes"]]
    return table(["script: models held while training", "bytes / param", *sizes], rows)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def render() -> dict:
    """Every table's markdown, by name."""
    toy, speed = load(TOY_JSON), load(SPEED / "speed.json")
    stems = ["speed", "speed-before", "speed-smollm-shape", "speed-smollm-shape-before",
             "speed-smollm-shape-fp32", "speed-smollm-shape-bf16", "speed-smollm-shape-dpo512-fp32",
             "speed-smollm-shape-dpo512-bf16"]
    files = {stem: load(SPEED / f"{stem}.json") for stem in stems}
    sweeps = {"toy_" + name.replace("-", "_"): render_sweep(run) for name, run in toy["runs"].items()
              if "sweep" in run}
    plain = [name for name, run in toy["runs"].items() if "sweep" not in run]
    more = [name for name in plain if name not in TOY_RUNS]  # the extra runs, apart from the defaults
    tables = {"toy": render_toy(toy, [name for name in plain if name in TOY_RUNS])}
    if more:
        tables["toy_more"] = render_toy(toy, more)
    return {**tables, **sweeps, "speed_trl": render_speed_trl(files),
            "speed_ppo": render_speed_ppo(speed), "speed_dpo_length": render_speed_dpo_length(speed),
            "speed_var_batch": render_speed_var_batch(speed), "speed_bf16": render_speed_bf16(files),
            "memory": render_memory(load(ROOT / "docs/results/memory.json"))}


def main(args: Args) -> None:
    if args.toy_runs:
        extra = dict(item.split("=", 1) for item in args.extra)
        TOY_JSON.write_text(json.dumps(summarise_toy(Path(args.toy_runs), extra), indent=1) + "\n")
        print(f"wrote {TOY_JSON.relative_to(ROOT)}")
    tables = render()
    for page in PAGES:
        path = ROOT / page
        text = path.read_text()
        if blocks(text, "table"):
            path.write_text(fill_blocks(text, tables, "table"))
            print(f"rendered {', '.join(blocks(text, 'table'))} in {page}")


if __name__ == "__main__":
    main(tyro.cli(Args))
