"""benchmark/speed.py's arithmetic and table on made-up numbers (the measurements themselves are runs
of minutes, never part of the suite)."""

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmark import speed  # noqa: E402


def test_step_times_drop_the_warmup_and_the_ratios_read_trl_over_minialign():
    stamps = [0.0, 5.0, 6.0, 7.0, 9.0]  # steps 2..5 took 5, 1, 1, 2 s; step 1 has no start stamp
    assert speed.median_step(stamps, warmup=1) == pytest.approx(1.5)
    assert speed.median_step(stamps, warmup=2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        speed.median_step(stamps, warmup=5)
    runs = [({"step_s": 1.0, "peak_mib": 10}, {"step_s": 2.0, "peak_mib": 30}),
            ({"step_s": 2.0, "peak_mib": 20}, {"step_s": 3.0, "peak_mib": 20}),
            ({"step_s": 1.0, "peak_mib": 10}, {"step_s": 1.0, "peak_mib": 20})]
    r = speed.summarise_trainer(runs, tokens_per_step=100.0)
    assert r["ratio"] == pytest.approx((1.0, 1.5, 2.0))
    assert r["minialign_tokens_per_s"] == pytest.approx(100.0)
    assert r["trl_tokens_per_s"] == pytest.approx(50.0)
    assert (r["minialign_peak_mib"], r["trl_peak_mib"]) == (20, 30)


def test_the_table_shows_every_part_it_is_given():
    setup = {"model": "toy/sft", "params_m": 1.7, "device": "cpu", "core": 1, "torch": "t",
             "transformers": "x", "trl": "1.16.0", "code": ".", "code_rev": "abc", "date": "today",
             "steps": 12, "warmup": 3, "pairs": 3, "batch_size": 16, "length_batch_size": 4}
    trainer = speed.summarise_trainer([({"step_s": 0.1, "peak_mib": 500}, {"step_s": 0.2, "peak_mib": 600})],
                                      tokens_per_step=400)
    phases = speed.summarise_phases([{"rollout": 2.0, "forwards": 1.0, "update": 3.0}],
                                    [{"rollout": 1.0, "forwards": 1.0, "update": 2.0}])
    lengths = []
    for L in (64, 128):  # step time proportional to the tokens
        runs = [({"step_s": L / 640, "peak_mib": 1}, {"step_s": L / 640, "peak_mib": 1})]
        lengths.append({"max_length": L, **speed.summarise_trainer(runs, tokens_per_step=8 * L)})
    var = [{"batch_size": 2, "groups": 64, "examples": 128, "scored": 256, "frozen_s": 1.28}]
    table = speed.format_tables({"setup": setup, "trainers": {"dpo": trainer},
                                 "ppo": {"phases": phases, "iterations": 1, "batch": 64,
                                         "response_len": "30"},
                                 "dpo_length": lengths, "var_batch": var})
    assert "| dpo | 400 | 100.0 | 200.0 | 2.00x / **2.00x** / 2.00x | 4000 | 2000 | 500 | 600 |" in table
    assert "| rollout: generate, 64 prompts x 30 tokens | 2000.0 | 1000.0 | 2.00x / **2.00x** / 2.00x |" \
        in table
    assert "| 128 | 1024 | 200.0 | 5120 | 1.00x |" in table  # linear: 1.00x per token
    assert "| 2 | 64 | 256 | 1.28 | 10.0 | 5.00 |" in table
    assert speed.format_tables({"setup": setup}).count("\n## ") == 0
