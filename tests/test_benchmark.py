"""benchmark/run.py's plan (the runs themselves take an hour and are not part of the suite): every
run a study reads is trained, once, before anything that needs it, with the arguments the study claims."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmark import run  # noqa: E402


def test_every_run_is_planned_once_before_its_users():
    studies = ["dera", "expo", "methods", "stability"]
    jobs = [job for seed in [0, 1, 2] for job in run.jobs_for_seed(seed, studies, "benchmark/runs")]
    names = [name for name, _ in jobs]
    first = {}
    for i, name in enumerate(names):
        first.setdefault(name, i)
    for i, (name, cmd) in enumerate(jobs):
        script, argv = cmd[0], dict(zip(cmd[1::2], cmd[2::2]))
        assert (ROOT / script).exists()
        if "--aligned" in argv:  # DeRa and ExPO read a DPO run trained earlier in the plan
            aligned = argv["--aligned"].removeprefix("benchmark/runs/")
            assert first[aligned] < i, name
        if script == "dpo.py" and name.startswith("dpo/beta"):
            assert float(argv["--beta"]) == float(name.split("/")[1].removeprefix("beta"))
    for seed in [0, 1, 2]:  # DPO retrained at beta / lambda for every lambda DeRa sweeps
        for lam in run.LAMBDAS[1:]:
            assert f"dpo/beta{run.BETA / lam:g}/seed{seed}" in first
    # the one run serving all four studies keeps its periodic sampling (the duplicates carry none)
    base = [cmd for name, cmd in jobs if name == "dpo/beta0.1/seed0"]
    assert "--sample_every" in base[0]
