"""benchmarks/finetune_interpolate.py (issue 16, results §5.9): the rule of §5.9 against an independent
recomputation on fabricated run files (the interpolation itself is tested in test_training.py)."""

from __future__ import annotations


import numpy as np
import pytest
from scipy.stats import wilcoxon

from _benchmarks import load_benchmark

fi = load_benchmark("finetune_interpolate")

TARGETS = ("epfl_hippocampus", "gala_fibsem", "gerhard_l3_vnc", "isbi2012")


def _rows(rng, gain: float, hurt: str | None = None):
    rows = []
    for t in TARGETS:
        for rank, s in enumerate(("a", "b", "c"), 1):
            for seed in (0, 1, 2):
                ft = rng.gamma(2.0, 0.2, 32)
                mix = ft - gain + rng.normal(0, 0.01, 32) + (1.0 if t == hurt else 0.0)
                rows.append({"target": t, "init": s, "seed": seed, "source_rank": rank, "top_ranked": "a",
                             "finetuned": {"test_vi": float(ft.mean()), "val_vi": 0.5, "tile_vi": ft.tolist()},
                             "interpolated": {"test_vi": float(mix.mean()), "val_vi": 0.4, "tile_vi": mix.tolist()}})
    return rows


def test_rule_against_an_independent_recomputation(rng):
    rows = _rows(rng, gain=0.05)
    s = fi.summarize(rows)
    d = np.concatenate([np.asarray(r["finetuned"]["tile_vi"]) - np.asarray(r["interpolated"]["tile_vi"])
                        for r in rows if r["init"] == "a"])
    assert s["top_ranked_finetuned_minus_interpolated"]["pairs"] == 384
    assert s["top_ranked_finetuned_minus_interpolated"]["p_value"] == pytest.approx(wilcoxon(d).pvalue)
    assert s["rule"]["adopt"] is True
    for t in TARGETS:
        top = sorted([r for r in rows if r["target"] == t and r["init"] == "a"], key=lambda r: r["seed"])
        red = [100 * (fi.fl.SCRATCH_VI[t][r["seed"]] - r["interpolated"]["test_vi"]) / fi.fl.SCRATCH_VI[t][r["seed"]]
               for r in top]
        got = s["targets"][t]["sources"]["a"]["vi_reduction_vs_scratch"]["test_vi_interpolated"]
        assert got["mean_percent"] == pytest.approx(np.mean(red))


def test_rule_refuses_a_gain_that_costs_one_target(rng):
    s = fi.summarize(_rows(rng, gain=0.3, hurt="gala_fibsem"))
    assert s["rule"]["worse_than_seed_sd"]["gala_fibsem"] is True
    assert s["rule"]["adopt"] is False
    partial = [r for r in _rows(rng, gain=0.05) if not (r["target"] == "isbi2012" and r["init"] == "a")]
    assert fi.summarize(partial)["rule"]["adopt"] is False
