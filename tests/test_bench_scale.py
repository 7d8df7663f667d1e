"""benchmarks/scale.py: its cost models, its fit, and one (stage, size) measured in process."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale  # noqa: E402

ARGS = argparse.Namespace(rows=2, batch=2, seq_len=16, new_tokens=4)


def test_param_count_matches_the_built_model():
    size = scale.SYNTHETIC[0]
    model = scale.build_model(size.name)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert sum(p.numel() for p in model.parameters()) - norms == size.params


def test_cost_models_grow_with_size_and_the_fit_recovers_a_constant():
    small, big = scale.SYNTHETIC[0], scale.SYNTHETIC[-1]
    for stage in ("locate_gradient", "locate_ablation", "sft_circuit", "generate"):
        assert scale.flops(stage, big, ARGS) > scale.flops(stage, small, ARGS) > 0
    rows = [{"stage": "sft_circuit", "size": s.name, "flops": scale.flops("sft_circuit", s, ARGS),
             "cpu_s": 2e-11 * scale.flops("sft_circuit", s, ARGS)} for s in scale.SYNTHETIC]
    assert scale.fit(rows)["sft_circuit"] == pytest.approx(2e-11)
    run = scale.default_run(scale.TARGETS[1], {})
    assert run["total_h100_min"] > 0 and run["peak_memory_gib_counted"] > 2 * scale.TARGETS[1].params / 2**30


@pytest.mark.parametrize("stage", ["locate_gradient", "sft_circuit"])
def test_one_stage_measures_time_units_and_memory(stage):
    row = scale.run_stage(stage, scale.SYNTHETIC[0].name, ARGS)
    assert row["cpu_s"] > 0 and row["units"] >= 1 and row["peak_rss_bytes"] >= row["peak_rss_before_stage_bytes"] > 0
