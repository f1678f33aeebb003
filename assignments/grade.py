"""Grades one assignment: imports the student's whole script and runs that assignment's checks on it.

    python assignments/grade.py dpo my_dpo.py                 # all three levels
    python assignments/grade.py dpo my_dpo.py --levels 1 2    # unit and wiring only (seconds)
    python assignments/grade.py dpo my_dpo.py --extra hidden/ # and the checks in hidden/*.py
    python assignments/grade.py dpo my_dpo.py --json results.json  # and Gradescope's results.json
    python assignments/grade.py dpo --list                    # the checks and their points

Prints one row per check (level, check, points, passed or why not) and the total; the exit code is 0
only at full marks. Runs offline on the toy (HF_HUB_OFFLINE=1 is set here)."""

import argparse
import importlib.util
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # checks.py, exercises.py; the toy's gold reward
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from checks import CHECKS, LEVELS  # noqa: E402
from exercises import EXERCISES  # noqa: E402

_loaded = itertools.count()


def load(path: Path):
    """The script at `path` as a fresh module (the scripts do nothing at import)."""
    spec = importlib.util.spec_from_file_location(f"graded_{Path(path).stem}_{next(_loaded)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extra(folder: Path) -> None:
    """A teacher's hidden checks: every .py file in `folder`, each registering with checks.check."""
    for file in sorted(Path(folder).glob("*.py")):
        load(file)


def why(error: BaseException) -> str:
    """One line: what failed and where, for the table."""
    if isinstance(error, NotImplementedError):
        return "not implemented"
    if isinstance(error, SystemExit):
        return str(error).strip().splitlines()[0] if str(error).strip() else f"exit {error.code}"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    frames = traceback.extract_tb(error.__traceback__)
    frame = frames[-1] if frames else None
    if frame and Path(frame.filename).name == "checks.py":  # the check's own line, not its helper's
        frame = next(f for f in frames if Path(f.filename).name == "checks.py")
    where = f" (line {frame.lineno} of {Path(frame.filename).name})" if frame else ""
    return f"{type(error).__name__}{': ' + text if text else ''}{where}"


def run_checks(method: str, module, levels=(1, 2, 3)) -> list:
    """[(check, passed, reason, seconds)] for the assignment's checks at `levels`, in order. Each check
    gets an empty scratch folder of its own, all inside one temporary folder removed at the end."""
    import torch

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, c in enumerate([c for c in CHECKS if c.method == method and c.level in levels]):
            start, tmp = time.time(), Path(scratch) / str(i)
            tmp.mkdir()
            torch.manual_seed(0)
            try:
                c.run(module, tmp)
                results.append((c, True, "", time.time() - start))
            except (Exception, SystemExit) as e:  # a wrong answer, any error (the scripts exit on bad input)
                results.append((c, False, why(e), time.time() - start))
    return results


def report(method: str, results: list) -> tuple:
    """Prints the table; returns (points, out of)."""
    got, total = sum(c.points for c, ok, *_ in results if ok), sum(c.points for c, *_ in results)
    width = max((len(c.name) for c, *_ in results), default=10)
    print(f"{'level':<14} {'check':<{width}} {'points':>6}  result")
    for c, ok, reason, seconds in results:
        shown = f"{c.points if ok else 0}/{c.points}"
        print(f"{c.level} {LEVELS[c.level]:<12} {c.name:<{width}} {shown:>6}  "
              f"{'passed' if ok else 'FAILED: ' + reason}  ({seconds:.1f}s)")
    for level in sorted({c.level for c, *_ in results}):
        spent = sum(s for c, _, _, s in results if c.level == level)
        print(f"level {level} ({LEVELS[level]}): {spent:.1f}s")
    print(f"\n{method}: {got} / {total} points")
    return got, total


def write_json(path: Path, method: str, results: list, seconds: float) -> None:
    """The results as the results.json a Gradescope autograder writes: the score and one test per check
    (https://gradescope-autograders.readthedocs.io/en/latest/specs/)."""
    tests = [{"name": c.name, "score": c.points if ok else 0, "max_score": c.points,
              "status": "passed" if ok else "failed", "output": "passed" if ok else reason,
              "visibility": "visible"} for c, ok, reason, _ in results]
    score, total = sum(t["score"] for t in tests), sum(t["max_score"] for t in tests)
    graded = {"score": score, "execution_time": round(seconds, 1),
              "output": f"{method}: {score} / {total} points", "tests": tests}
    Path(path).write_text(json.dumps(graded, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(EXERCISES))
    parser.add_argument("file", nargs="?", help="the student's script")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], choices=sorted(LEVELS))
    parser.add_argument("--extra", type=Path, help="a folder of hidden checks (*.py using checks.check)")
    parser.add_argument("--json", type=Path, help="also write the results here, as Gradescope's results.json")
    parser.add_argument("--list", action="store_true", help="list the checks and their points")
    args = parser.parse_args(argv)
    if args.extra:
        load_extra(args.extra)
    if args.list:
        for c in CHECKS:
            if c.method == args.method:
                print(f"{c.level} {LEVELS[c.level]:<12} {c.points:>2}  {c.name}")
        return 0
    if not args.file:
        parser.error("give the file to grade (or --list)")
    start = time.time()
    try:
        module = load(Path(args.file))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a syntax error, a failing import: every check fails, saying why
        checks = [c for c in CHECKS if c.method == args.method and c.level in args.levels]
        results = [(c, False, f"could not import the file: {why(e)}", 0.0) for c in checks]
    else:
        results = run_checks(args.method, module, args.levels)
    got, total = report(args.method, results)
    if args.json:
        write_json(args.json, args.method, results, time.time() - start)
    return 0 if got == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
