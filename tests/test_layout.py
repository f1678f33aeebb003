"""The shape of every script (issue 19): the method reads top to bottom in at most 600 lines, ending
in a `main` of at most ~100 lines that calls named functions (no closures); the shared plumbing comes
after it, under one banner, and tests/test_twins.py keeps its copies identical."""

import ast

import pytest

from conftest import ROOT

SCRIPTS = ["sft.py", "reward_model.py", "dpo.py", "ppo.py", "var.py", "dera.py", "expo.py"]
BANNER = "# ---- Plumbing "


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_method_fits_in_600_lines_and_main_in_100(script):
    source = (ROOT / script).read_text()
    lines = source.splitlines()
    assert max(map(len, lines)) <= 110
    banner = next(i for i, line in enumerate(lines) if line.startswith(BANNER))
    assert banner <= 600, f"{script}: the method part is {banner} lines"
    tree = ast.parse(source)
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno < banner + 1  # main closes the method part
    length = main.end_lineno - main.lineno + 1
    assert length <= 100, f"{script}: main is {length} lines"
    nested = [n for n in ast.walk(main) if isinstance(n, (ast.FunctionDef, ast.Lambda)) and n is not main]
    assert not nested, f"{script}: main defines closures"
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    after = {n.name for n in defs if n.lineno > banner}
    assert "cli" in after and not after & {n.name for n in defs if n.lineno < banner}
