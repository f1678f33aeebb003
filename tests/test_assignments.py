"""The course kit tests itself (issue 22): the committed stubs and handouts are what make.py writes;
every level-1/2 check passes on the reference script and fails on the stub; every mutant in the
catalogue fails at least one check; one end-to-end grade runs, and hidden checks can be added."""

import sys

import pytest

from conftest import ROOT

sys.path[:0] = [str(ROOT / "assignments")]
import grade  # noqa: E402
import make  # noqa: E402
import mutants  # noqa: E402
from checks import CHECKS  # noqa: E402
from exercises import EXERCISES  # noqa: E402


def test_committed_stubs_and_handouts_are_what_make_writes():
    for path, content in make.outputs().items():
        assert path.read_text() == content, f"{path} is stale: run python assignments/make.py"


@pytest.mark.parametrize("method", sorted(EXERCISES))
def test_checks_pass_on_the_reference_and_fail_on_the_stub(method):
    script, _ = EXERCISES[method]
    reference = grade.run_checks(method, grade.load(ROOT / script), levels=(1, 2))
    assert reference and all(ok for _, ok, *_ in reference), [(c.name, why) for c, ok, why, _ in reference
                                                              if not ok]
    stub = grade.run_checks(method, grade.load(ROOT / "assignments" / "stubs" / script), levels=(1, 2))
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


def test_an_end_to_end_grade_and_hidden_checks(tmp_path, capsys):
    assert grade.main(["dera", str(ROOT / "dera.py")]) == 0  # full marks, all three levels
    assert "dera: 15 / 15 points" in capsys.readouterr().out
    (tmp_path / "hidden.py").write_text(
        "from checks import check\n\n\n@check('dera', 2, 1)\ndef hidden(m, tmp):\n"
        "    '''a teacher's hidden check'''\n    assert m.realigned_logits.__doc__ is None\n")
    try:
        argv = ["dera", str(ROOT / "dera.py"), "--levels", "1", "2", "--extra", str(tmp_path)]
        assert grade.main(argv) == 1
        assert "a teacher's hidden check" in capsys.readouterr().out
    finally:
        CHECKS[:] = [c for c in CHECKS if c.name != "a teacher's hidden check"]
