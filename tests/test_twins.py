"""The scripts share nothing at import time, so helpers are copied between them. Every copy must be
the same text in every script that has it, except the few that differ on purpose (listed with their
reasons): a fix made to one copy then cannot silently miss the others."""

import ast
from collections import defaultdict
from pathlib import Path

from conftest import ROOT

SCRIPTS = ["sft.py", "reward_model.py", "dpo.py", "ppo.py", "var.py", "dera.py", "expo.py"]

DIFFER_ON_PURPOSE = {
    "Args": "each script's own arguments",
    "check_args": "each script's own arguments",
    "main": "each script's own method",
    "build_pairs": "reward_model.py keeps whole pairs without labels and never truncates (a cut "
                   "response would be scored on what it does not say); dpo.py labels the responses",
    "collate_pairs": "reward_model.py right-pads for the score at the last token; dpo.py aligns the "
                     "responses for the head-only log-probs",
    "evaluate": "reward_model.py measures pairwise accuracy; ppo.py samples with its own rollout",
    "evaluate_samples": "expo.py samples with args.batch_size itself and returns the samples; dpo.py and "
                        "var.py with 4x theirs, writing them",
    "load_model": "sft.py also starts from a config without weights (random initialisation)",
    "check_output_dir": "dera.py and expo.py train nothing, so they never resume: no --resume branch",
    "create_output_dir": "dera.py and expo.py train nothing, so they never resume: no --resume branch",
}


def top_level_definitions(path: Path) -> dict:
    """name -> source text (decorators included) of each top-level function, class and constant."""
    source = path.read_text()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            decorators = "".join("@" + ast.get_source_segment(source, d) + "\n" for d in node.decorator_list)
            found[node.name] = decorators + ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.get_source_segment(source, node)
    return found


def test_every_copied_helper_is_identical_in_every_script():
    copies = defaultdict(dict)
    for script in SCRIPTS:
        for name, text in top_level_definitions(ROOT / script).items():
            copies[name][script] = text
    shared = {name: by for name, by in copies.items() if len(by) > 1}
    assert len(shared) > 40  # the check is really looking at the copies
    differing = {}
    for name, by in shared.items():
        variants = defaultdict(list)
        for script, text in by.items():
            variants[text].append(script)
        if len(variants) > 1:
            differing[name] = sorted(variants.values())
    unexpected = {name: v for name, v in differing.items() if name not in DIFFER_ON_PURPOSE}
    assert not unexpected, f"copies that drifted apart (fix every copy, or list the reason): {unexpected}"
    stale = set(DIFFER_ON_PURPOSE) - set(differing)
    assert not stale, f"listed as differing on purpose but identical now: {stale}"
