"""Every option binds: for each field of a script's `Args`, every read of `args.<field>` is replaced by
the field's default, so that the script behaves as if the option were never given, and the script's
tests run (`tests_of`): one of them must fail. The reads inside the argument checks stay: checking an
option is not using it. Not part of the suite (one pytest run per field, stopped at its first failure):

    python tests/options.py --jobs 2            # every field of every script, two runs at a time
    python tests/options.py dera.py             # the fields of one script
    python tests/options.py dera.py top_k seed  # some fields of one script

Prints one line per field: caught, exempt (with the reason no test here can see it), SURVIVED, or
TIMEOUT (no test failed, but the run outlasted --timeout: an option ignored made it slow)."""

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mutations import ROOT, copy_of_repository

OWN = {  # each script's own test files, run whole
    "sft.py": ["test_sft.py"], "reward_model.py": ["test_reward_model.py"], "dpo.py": ["test_dpo.py"],
    "var.py": ["test_var.py"], "ppo.py": ["test_ppo.py"], "dera.py": ["test_dera.py", "test_identities.py"],
    "expo.py": ["test_expo.py", "test_identities.py"]}
SHARED = [  # of these, only the tests that name the script
    "test_options.py", "test_wiring.py", "test_bad_inputs.py", "test_implicit_prompts.py", "test_logps.py",
    "test_bf16.py", "test_real_like.py", "test_tracking.py"]
EVERYWHERE = {  # fields no test on this machine can tell from their default, and why
    "device": "the tests run where the default ('auto') runs them, on this machine's CPU; a CUDA device "
              "is a machine the suite does not have",
    "trust_remote_code": "passed to transformers for hub models that ship their own code; the toy and "
                         "the real-like tier have none, so True and False load them alike",
}
EXEMPT = {(script, field): why for script in OWN for field, why in EVERYWHERE.items()}
CHECKS = ("check_args", "training_problems")  # reads here validate the option; they stay


def fields(script: str) -> dict:
    """{field: the source of its default} of the script's Args, in order."""
    tree = ast.parse((ROOT / script).read_text())
    args = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args")
    out = {}
    for node in args.body:
        if isinstance(node, ast.AnnAssign):
            value = node.value
            if isinstance(value, ast.Call):  # field(default_factory=lambda: [...])
                value = value.keywords[0].value.body
            out[node.target.id] = ast.unparse(value)
    return out


def ignore(text: str, field: str, constant: str) -> tuple:
    """The script's text with every read of args.<field> outside the checks replaced by the constant,
    and the number of reads replaced."""
    tree = ast.parse(text)
    kept = [range(node.lineno, node.end_lineno + 1) for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name in CHECKS]
    read = re.compile(rf"\bargs\.{field}\b(?!\s*=[^=])")  # not `args.<field> = ...`
    lines, count = text.splitlines(keepends=True), 0
    for i, line in enumerate(lines):
        if not any(i + 1 in span for span in kept):
            lines[i], n = read.subn(f"({constant})", line)
            count += n
    return "".join(lines), count


def tests_of(script: str) -> list:
    """The shared files' tests that name the script (in their parameters, or in their source where the
    parameters name no script), tests/test_options.py's first, and the script's own files whole.
    tests/test_distributed.py is left out: it compares two processes with one, and an ignored option
    acts on both alike."""
    name = script[:-3]
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             *[f"tests/{f}" for f in SHARED]], cwd=ROOT, capture_output=True, text=True)
    sources = {}
    for f in SHARED:
        text = (ROOT / "tests" / f).read_text()
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef):
                sources[f, node.name] = ast.get_source_segment(text, node)
    chosen = []
    for node_id in listed.stdout.splitlines():
        path, _, test = node_id.partition("::")
        function, _, params = test.partition("[")
        names_a_script = any(other[:-3] in params for other in OWN)
        if "::" in node_id and (name in params if names_a_script else name in sources[path[6:], function]):
            chosen.append(node_id)
    first = [node for node in chosen if node.startswith(f"tests/{SHARED[0]}")]  # the quickest to fail
    return first + [f"tests/{f}" for f in OWN[script]] + [node for node in chosen if node not in first]


def pytest(repo: Path, targets: list, jobs: int, timeout: float) -> str:
    """The verdict of the targets' run: caught (a test failed), SURVIVED, or TIMEOUT (a run that the
    ignored option made slow, but that no test failed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if jobs > 1 else None  # the jobs share the cores
    try:
        code = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               *targets], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return f"TIMEOUT (over {timeout:.0f} s)"
    return "caught" if code == 1 else f"SURVIVED (pytest exit {code})"  # 2-5: errors prove nothing


def run_one(script: str, field: str, default: str, tests: list, snapshot: Path, jobs: int,
            timeout: float) -> str:
    """One field ignored in a copy of the snapshot, and the verdict of the script's tests on it."""
    if (script, field) in EXEMPT:
        return f"exempt    {script} {field}: {EXEMPT[script, field]}"
    constant = default
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(shutil.copytree(snapshot, Path(tmp) / "repo"))
        text, count = ignore((repo / script).read_text(), field, constant)
        if count == 0:
            return f"SURVIVED  {script} {field}: never read outside the checks"
        (repo / script).write_text(text)
        verdict = pytest(repo, tests, jobs, timeout)
    return f"{verdict:9} {script} {field} = {constant} ({count} reads, {time.time() - start:.0f} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", nargs="?", help="only this script's fields")
    parser.add_argument("fields", nargs="*", help="only these fields")
    parser.add_argument("--jobs", type=int, default=1, help="pytest runs at a time (each with one thread)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a field's pytest run may take")
    args = parser.parse_args()
    scripts = [args.script] if args.script else list(OWN)
    tests = {s: tests_of(s) for s in scripts}
    todo = [(s, f, d, tests[s]) for s in scripts for f, d in fields(s).items() if f in (args.fields or [f])]
    if not todo:
        raise SystemExit(f"error: no field {args.fields} in {scripts}")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        snapshot = copy_of_repository(Path(tmp))  # the tree as it is now, whatever is edited meanwhile

        def report(job):
            print(line := run_one(*job, snapshot, args.jobs, args.timeout), flush=True)
            return line
        lines = list(pool.map(report, todo))
    survived = [line for line in lines if line.startswith(("SURVIVED", "TIMEOUT"))]
    print(f"{len(lines)} fields: {sum(line.startswith('caught') for line in lines)} caught, "
          f"{sum(line.startswith('exempt') for line in lines)} exempt, {len(survived)} survived")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
