"""README.md and docs/: every table of numbers is what docs/render.py renders from its committed JSON (the
benchmark's are tests/test_benchmark.py's), the README stays a ten-minute read, and every relative link
points at a file (and heading) that exists."""

import importlib.util
import json
import re
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmark import report  # noqa: E402

# docs/ is no package: load docs/render.py by its path
_spec = importlib.util.spec_from_file_location("docs_render", ROOT / "docs" / "render.py")
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_table_is_rendered_from_its_json():
    tables = render.render()
    found = set()
    for page in PAGES:
        for name, text in report.blocks(page.read_text(), "table").items():
            assert text == tables[name], f"{page.name}: the {name} table differs from its JSON's"
            found.add(name)
    assert found == set(tables)  # every table is shown somewhere
    assert set(report.blocks((ROOT / "README.md").read_text(), "table")) == {"toy"}  # the README's one


def test_no_table_of_numbers_is_typed_by_hand():
    """Outside the rendered blocks (and code), no table cell is a bare measurement such as 3.12, 86%, 1.2x."""
    number = re.compile(r"\**[-+~]?[\d.,]+\s*(%|x|ms|GB|s|m\d+s)?\**( ± [\d.,]+%?| \([\d.,x-]+\))?")
    for page in PAGES:
        text = re.sub(r"<!-- (benchmark|table):(\w+) -->.*?<!-- /\1:\2 -->", "", page.read_text(), flags=re.S)
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        for line in text.splitlines():
            if line.startswith("|"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                assert not any(number.fullmatch(c) for c in cells), f"{page.name}: {line}"


def test_the_toy_table_is_the_default_runs():
    toy = json.loads(render.TOY_JSON.read_text())
    for name in render.TOY_RUNS:
        assert toy["runs"][name]["command"] == f"python {name}.py", name


def test_speed_json_is_what_its_markdown_shows():
    """speed.py wrote each .md from its run's JSON (the before runs' JSON was read back from their .md)."""
    for path in sorted((ROOT / "benchmark/results").glob("speed*.json")):
        results = json.loads(path.read_text())
        md = path.with_suffix(".md").read_text()
        for method, r in results.get("trainers", {}).items():
            lo, mid, hi = r["ratio"]
            row = (f"| {method} | {r['tokens_per_step']:.0f} | {1000 * r['minialign_step_s']:.1f} | "
                   f"{1000 * r['trl_step_s']:.1f} | {lo:.2f}x / **{mid:.2f}x** / {hi:.2f}x | "
                   f"{r['minialign_tokens_per_s']:.0f} | {r['trl_tokens_per_s']:.0f} |")
            assert row in md, f"{path.name}: {method}"


def test_the_readme_is_short_and_keeps_the_ci_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.split()) <= 2000  # `wc -w README.md`
    assert "```bash\npytest -q\n```" in readme  # .ci/run runs the README's test command


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no links inside code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: {target}"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                assert anchor in {slug(h) for h in headings}, f"{page.name}: {target}"
