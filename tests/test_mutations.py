"""The hand-made mistakes of tests/mutations.py still point at real code: each `old` text is in its
script exactly once and each named test exists. (Running them, one pytest each, is
`python tests/mutations.py`, outside the suite.)"""

import re

import pytest

from conftest import ROOT
from mutations import MUTATIONS


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[f"{m.script}: {m.mistake}" for m in MUTATIONS])
def test_every_mutation_still_applies_to_its_script(mutation):
    count = (ROOT / mutation.script).read_text().count(mutation.old)
    assert count == 1, f"its old text occurs {count} times in {mutation.script}: update tests/mutations.py"
    path, _, name = mutation.test.partition("::")
    function = re.sub(r"\[.*\]$", "", name)
    assert f"def {function}(" in (ROOT / path).read_text(), f"{mutation.test} does not exist"
