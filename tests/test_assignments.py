"""The course kit tests itself (issue 22): the committed handouts are what make.py writes; every
level-1/2 check passes on the reference script and fails on the stub make.py generates; every mutant
in the catalogue fails at least one check; one end-to-end grade runs, hidden checks can be added, and
the Gradescope results.json reads back."""

import json
import sys

import pytest

from conftest import ROOT

sys.path[:0] = [str(ROOT / "assignments")]
import grade  # noqa: E402
import make  # noqa: E402
import mutants  # noqa: E402
from checks import CHECKS  # noqa: E402
from exercises import EXERCISES  # noqa: E402


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """The folder make.py writes the stubs into (they are not committed)."""
    folder = tmp_path_factory.mktemp("stubs")
    make.write_stubs(folder)
    return folder


def test_committed_handouts_are_what_make_writes():
    for path, content in make.handouts().items():
        assert path.read_text() == content, f"{path} is stale: run python assignments/make.py"


@pytest.mark.parametrize("method", sorted(EXERCISES))
def test_checks_pass_on_the_reference_and_fail_on_the_stub(method, stubs):
    script, _ = EXERCISES[method]
    reference = grade.run_checks(method, grade.load(ROOT / script), levels=(1, 2))
    assert reference and all(ok for _, ok, *_ in reference), [(c.name, why) for c, ok, why, _ in reference
                                                              if not ok]
    stub = grade.run_checks(method, grade.load(stubs / script), levels=(1, 2))
    passing_on_stub = [c.name for c, ok, *_ in stub if ok]
    assert not passing_on_stub, f"checks that a stub passes check nothing: {passing_on_stub}"
    assert {c.level for c in CHECKS if c.method == method} == {1, 2, 3}


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=[f"{m[0]}: {m[1]}" for m in mutants.MUTANTS])
def test_every_mutant_loses_points(mutant):
    method, _, function, source = mutant
    module = grade.load(ROOT / EXERCISES[method][0])
    mutants.apply(module, function, source)
    results = grade.run_checks(method, module, levels=(1, 2))
    assert any(not ok for _, ok, *_ in results), "no check catches this mistake"


def test_a_failure_names_the_mistake():
    no_clip = [m for m in mutants.MUTANTS if "loss = masked_mean(-advantages * ratio, mask)" in m[3]]
    assert len(no_clip) == 1, "the PPO loss with no clip at all is in the catalogue"
    _, _, function, source = no_clip[0]
    module = grade.load(ROOT / "ppo.py")
    mutants.apply(module, function, source)
    reasons = [why for c, ok, why, _ in grade.run_checks("ppo", module, levels=(1,)) if not ok]
    assert any("— that is no clipping" in why for why in reasons), reasons


def test_results_json_for_gradescope(tmp_path, stubs):
    checks = [c for c in CHECKS if c.method == "dpo" and c.level in (1, 2)]
    broken = tmp_path / "broken.py"
    broken.write_text("def dpo_loss(:\n")
    for file, passes in ((ROOT / "dpo.py", True), (stubs / "dpo.py", False), (broken, False)):
        argv = ["dpo", str(file), "--levels", "1", "2", "--json", str(tmp_path / "results.json")]
        assert grade.main(argv) == (0 if passes else 1)
        results = json.loads((tmp_path / "results.json").read_text())
        assert [t["name"] for t in results["tests"]] == [c.name for c in checks]
        assert [t["max_score"] for t in results["tests"]] == [c.points for c in checks]
        assert results["score"] == sum(t["score"] for t in results["tests"])
        assert results["score"] == (sum(c.points for c in checks) if passes else 0)
        assert all(t["status"] == ("passed" if passes else "failed") for t in results["tests"])
    assert all(t["output"].startswith("could not import the file: SyntaxError") for t in results["tests"])


def test_an_end_to_end_grade_and_hidden_checks(tmp_path, capsys):
    assert grade.main(["dera", str(ROOT / "dera.py")]) == 0  # full marks, all three levels
    assert "dera: 17 / 17 points" in capsys.readouterr().out
    (tmp_path / "hidden.py").write_text(
        "from checks import check\n\n\n@check('dera', 2, 1)\ndef hidden(m, tmp):\n"
        "    '''a teacher's hidden check'''\n    assert m.realigned_logits.__doc__ is None\n")
    try:
        argv = ["dera", str(ROOT / "dera.py"), "--levels", "1", "2", "--extra", str(tmp_path)]
        assert grade.main(argv) == 1
        assert "a teacher's hidden check" in capsys.readouterr().out
    finally:
        CHECKS[:] = [c for c in CHECKS if c.name != "a teacher's hidden check"]
