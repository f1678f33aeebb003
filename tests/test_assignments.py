"""The course kit tests itself (issues 22 and 38): the committed handouts are what make.py writes;
every level-1/2 check passes on the reference script and fails on the stub make.py generates; every
mutant in the catalogue costs exactly one check (or its handout says why two), and the named ones are
named in their feedback; a pack grades in a folder of its own, without the repository, and holds no
reference script and no exercise's answer; hidden checks can be added, and the Gradescope
results.json reads back."""

import ast
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path[:0] = [str(ROOT / "assignments")]
import grade  # noqa: E402
import make  # noqa: E402
import mutants  # noqa: E402
from checks import CHECKS  # noqa: E402
from exercises import EXERCISES  # noqa: E402

ANSWERS = {name for _, names in EXERCISES.values() for name in names}  # an exercise anywhere


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """The folder make.py writes the stubs into (they are not committed)."""
    folder = tmp_path_factory.mktemp("stubs")
    make.write_stubs(folder)
    return folder


def test_committed_handouts_are_what_make_writes():
    for path, content in make.handouts().items():
        assert path.read_text() == content, f"{path} is stale: run python assignments/make.py --handouts"


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


def bodies(source: str) -> dict:
    """Each exercise defined in the source: name -> its body after the docstring, as source."""
    tree = ast.parse(source)
    return {n.name: "\n".join(ast.unparse(b) for b in n.body[1:]) for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name in ANSWERS}


def test_no_stub_holds_an_answer(stubs):
    for script, _ in EXERCISES.values():
        for name, body in bodies((stubs / script).read_text()).items():
            assert body.startswith("raise NotImplementedError"), f"{script} holds the answer to {name}"


def mutated(mutant):
    method, _, function, source = mutant
    module = grade.load(ROOT / EXERCISES[method][0])
    mutants.apply(module, function, source)
    return [(c, why) for c, ok, why, _ in grade.run_checks(method, module, levels=(1, 2)) if not ok]


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=[f"{m[0]}: {m[1]}" for m in mutants.MUTANTS])
def test_every_mutant_costs_one_check_and_is_named(mutant):
    method, mistake = mutant[:2]
    failed = mutated(mutant)
    assert failed, "no check catches this mistake"
    if mistake in mutants.TWICE:
        assert len(failed) == 2, [c.name for c, _ in failed]
        handout = (ROOT / "assignments" / f"{method}.md").read_text()
        assert mutants.TWICE[mistake] in " ".join(handout.split()), "the handout does not say why it costs twice"
    else:
        assert len(failed) == 1, f"one mistake, several charges: {[c.name for c, _ in failed]}"
    if mistake in mutants.NAMED:
        assert any(mutants.NAMED[mistake] in why for _, why in failed), [why for _, why in failed]


def test_a_failure_names_the_mistake():
    no_clip = [m for m in mutants.MUTANTS if "loss = masked_mean(-advantages * ratio, mask)" in m[3]]
    assert len(no_clip) == 1, "the PPO loss with no clipping at all is in the catalogue"
    assert any("— that is no clipping" in why for _, why in mutated(no_clip[0]))


def unusual(method: str, function: str, source: str) -> list:
    """The level-1/2 failures of the reference with `function` written another correct way."""
    module = grade.load(ROOT / EXERCISES[method][0])
    mutants.apply(module, function, source)
    return [(c.name, why) for c, ok, why, _ in grade.run_checks(method, module, levels=(1, 2)) if not ok]


CORRECT_OTHERWISE = [  # correct code written as students do, which the new checks must pass
    ("dpo", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        two = torch.stack([beta * h, torch.zeros_like(h)], 1)  # softmax of (beta h, 0): sigmoid(beta h) first
        first, second = torch.zeros_like(h).long(), torch.ones_like(h).long()
        losses = ((1 - label_smoothing) * F.cross_entropy(two, first, reduction="none")
                  + label_smoothing * F.cross_entropy(two, second, reduction="none"))
    return losses, (beta * chosen).detach(), (beta * rejected).detach()
'''),
    ("dpo", "dpo_loss", '''
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "ipo":
        return ((h - 0.5 / beta) ** 2, beta * (policy_chosen_logps - ref_chosen_logps).detach(),
                beta * (policy_rejected_logps - ref_rejected_logps).detach())
    x = beta * h
    losses = F.binary_cross_entropy_with_logits(x, torch.full_like(x, 1 - label_smoothing), reduction="none")
    return (losses, beta * (policy_chosen_logps - ref_chosen_logps).detach(),
            beta * (policy_rejected_logps - ref_rejected_logps).detach())
'''),
    ("reward_model", "bradley_terry_loss", '''
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    margin = chosen_rewards.float() - rejected_rewards.float()
    return F.binary_cross_entropy_with_logits(margin, torch.ones_like(margin), reduction="none")
'''),
    ("ppo", "eos_trick", '''
def eos_trick(scores, finished, penalty):
    out = scores.clone()
    out[~finished] = penalty
    return out
'''),
    ("ppo", "ppo_value_loss", '''
def ppo_value_loss(values, old_values, returns, mask, clip):
    clipped_values = torch.max(torch.min(values, old_values + clip), old_values - clip)
    losses = torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    n = mask.sum()
    return 0.5 * (losses * mask).sum() / n, (((values - old_values).abs() > clip).float() * mask).sum() / n
'''),
    ("ppo", "compute_gae", '''
def compute_gae(rewards, values, mask, gamma, lam):
    B, R = rewards.shape
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(B, 1)], 1)
    deltas = (rewards + gamma * next_values - values) * mask
    powers = (gamma * lam) ** (torch.arange(R)[None, :] - torch.arange(R)[:, None]).clamp(min=0).float()
    upper = torch.triu(powers)
    advantages = (deltas @ upper.T) * mask
    return advantages, (advantages + values) * mask
'''),
]


@pytest.mark.parametrize("case", CORRECT_OTHERWISE, ids=[f"{c[0]}: {c[1]} #{i}" for i, c in
                                                          enumerate(CORRECT_OTHERWISE)])
def test_correct_code_written_otherwise_gets_full_marks(case):
    assert not unusual(*case)


def test_a_pack_grades_without_the_repository(tmp_path):
    pack = tmp_path / "pack"
    files = {str(p.relative_to(pack)) for p in make.write_pack("dpo", pack)}
    assert {"dpo.py", "dpo.md", "assignments/grade.py", "assignments/checks.py", "assignments/exercises.py",
            "toy/make.py", "toy/sft/model.safetensors", "toy/rm/model.safetensors"} <= files
    assert not any(f.startswith(("toy/dpo/", "toy/base/", "toy/data/sft/")) for f in files), "more than it needs"
    scripts = {(ROOT / script).read_text() for script, _ in EXERCISES.values()}
    for path in pack.rglob("*.py"):
        source = path.read_text()
        assert source not in scripts, f"{path.name} is a reference script"
        for name, body in bodies(source).items():
            assert path.parent.name == "assignments" or body.startswith("raise NotImplementedError"), \
                f"{path.name} holds the answer to {name}"
    submission = tmp_path / "alice.py"  # the reference, graded as a student's file, from the pack alone
    submission.write_text((ROOT / "dpo.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "assignments/grade.py", "dpo", str(submission), "--levels", "1", "2"],
                         cwd=pack, env=env, capture_output=True, text=True, timeout=120)
    total = sum(c.points for c in CHECKS if c.method == "dpo" and c.level in (1, 2))
    assert run.returncode == 0 and f"dpo: {total} / {total} points" in run.stdout, run.stdout + run.stderr
    with pytest.raises(SystemExit):
        make.write_pack("dpo", ROOT / "assignments" / "pack")  # nothing lands in the repository


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
