"""benchmarks/transfer_real.py (issue 16 item 1): its statistics against an independent recomputation, and one
CI-size run on a real target whose outputs and test tiles are checked by brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import friedmanchisquare, rankdata, spearmanr, wilcoxon

from _benchmarks import load_benchmark

tr = load_benchmark("transfer_real")


def _write_rows(out: Path, rng) -> dict:
    """Fabricated run files: 2 targets x 3 sources + scratch, n = 4, 3 seeds, 32 test tiles each."""
    truth = {}
    for t in ("tA", "tB"):
        ranks = {"s1": 1, "s2": 2, "s3": 3}
        for seed in range(3):
            for init in ("s1", "s2", "s3", "scratch"):
                vi = rng.gamma(2.0, 0.3 + 0.1 * (ranks.get(init, 5) if t == "tA" else 4 - ranks.get(init, 0)), 32)
                row = {"run_id": f"{t}__{init}__n4__s{seed}", "target": t, "init": init, "n": 4, "seed": seed,
                       "strategy": "median", "init_kind": "scratch" if init == "scratch" else "source",
                       "source_rank": ranks.get(init), "best_source": "s1", "is_best_source": init == "s1",
                       "vi_total": float(vi.mean()), "tile_vi": vi.tolist(), "tile_truth_segments": [3] * 32}
                if init == "scratch":
                    row["scratch_curve"] = [{"steps": 200, "val_vi": 1.0, "loss": 0.5}]
                truth[(t, init, seed)] = vi
                (out / "runs").mkdir(parents=True, exist_ok=True)
                (out / "runs" / f"{row['run_id']}.json").write_text(json.dumps(row))
    return truth


def test_summary_matches_an_independent_recomputation(tmp_path, rng):
    truth = _write_rows(tmp_path, rng)
    s = tr.report(tmp_path, reduced=True)["by_n"][4]
    srcs = ("s1", "s2", "s3")
    pooled_rank, pooled_vi = [], []
    for t in ("tA", "tB"):
        mean = {s_: np.mean([truth[(t, s_, k)].mean() for k in range(3)]) for s_ in srcs}
        got = s["per_target"][t]
        assert got["spearman_rho"] == pytest.approx(spearmanr([1, 2, 3], [mean[x] for x in srcs]).statistic)
        assert got["top1_regret"] == pytest.approx(mean["s1"] - min(mean.values()))
        sd = np.sqrt(np.mean([np.var([truth[(t, x, k)].mean() for k in range(3)], ddof=1) for x in srcs]))
        assert got["seed_sd"] == pytest.approx(sd)
        blocks = [np.concatenate([truth[(t, x, k)] for k in range(3)]) for x in srcs]
        ref = friedmanchisquare(*blocks)
        assert got["friedman"]["p_value"] == pytest.approx(ref.pvalue)
        assert got["friedman"]["n_blocks"] == 96
        red = [100 * (truth[(t, "scratch", k)].mean() - truth[(t, "s1", k)].mean()) / truth[(t, "scratch", k)].mean()
               for k in range(3)]
        assert s["vi_reduction_vs_scratch"][t]["mean_percent"] == pytest.approx(np.mean(red))
        diff = np.concatenate([truth[(t, "scratch", k)] - truth[(t, "s1", k)] for k in range(3)])
        assert got["top_vs_scratch"]["p_value"] == pytest.approx(wilcoxon(diff).pvalue)
        assert got["top_vs_scratch"]["n_pairs"] == 96
        pooled_rank += [1, 2, 3]
        pooled_vi += list(rankdata([mean[x] for x in srcs]))
    rho = spearmanr(pooled_rank, pooled_vi).statistic
    assert s["pooled_spearman_rho"] == pytest.approx(rho)
    acc = json.loads((tmp_path / "summary.json").read_text())["acceptance"]
    assert acc["pooled_rho_ge_0.6"]["pass"] == (rho >= 0.6)
    report = (tmp_path / "report.md").read_text()
    assert "REDUCED" in report and ("PASS" in report or "FAIL" in report)


@pytest.mark.realdata
def test_test_tiles_are_far_from_every_annotatable_tile(em_data):
    for name, spec in tr.TARGETS.items():
        tgt = tr.load_target(name, em_data)
        assert len(tgt["test_img"]) == 32
        assert tgt["test_img"].shape[1:] == (spec["tile"],) * 2 and spec["tile"] >= (96 if name == "gala_fibsem" else 128)
        if tgt["same_stack"]:  # brute force: every test slice against every slice that can be annotated
            gaps = [abs(zt - zp) for zt in tgt["test_z_abs"] for zp in tgt["pool_z_abs"]]
            assert min(gaps) >= 10, name
        else:
            assert name in ("gala_fibsem", "epfl_hippocampus")


@pytest.mark.realdata
@pytest.mark.slow  # two trainings, each exporting its package to ONNX: ~40 s unloaded on 2 cores
def test_ci_size_run_on_a_real_target(tmp_path, em_data, monkeypatch):
    monkeypatch.setenv("NEUROADDA_DATA", str(em_data))
    out = tmp_path / "bench"
    args = ["--out", str(out), "--targets", "isbi2012", "--sources", "gerhard_l3_vnc", "--n", "1", "--seeds", "0",
            "--steps", "2", "--scratch-chunk", "2", "--scratch-max", "2", "--pool", "8", "--device", "cpu"]
    assert tr.main(args) == 0
    rows = {json.loads(p.read_text())["init_kind"]: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(rows) == {"as_is", "source", "scratch"}
    for r in rows.values():
        assert len(r["tile_vi"]) == 32
        assert r["vi_total"] == pytest.approx(np.mean(r["tile_vi"]))
    # the same test tiles for every run, each >= 10 slices from every annotated tile (brute force)
    tests = {json.dumps(r["test_coords"]) for r in rows.values()}
    assert len(tests) == 1
    test_z = [c[0] for c in rows["source"]["test_coords"]]
    for r in (rows["source"], rows["scratch"]):
        assert len(r["tile_coords"]) == 1
        assert min(abs(zt - c[0]) for zt in test_z for c in r["tile_coords"]) >= 10
    assert rows["source"]["tile_coords"] == rows["scratch"]["tile_coords"]  # scratch uses the top source's tiles
    assert rows["scratch"]["scratch_curve"][0]["steps"] == 2
    summary = json.loads((out / "summary.json").read_text())
    s1 = summary["by_n"]["1"]
    red = 100 * (rows["scratch"]["vi_total"] - rows["source"]["vi_total"]) / rows["scratch"]["vi_total"]
    assert s1["vi_reduction_vs_scratch"]["isbi2012"]["mean_percent"] == pytest.approx(red)
    assert s1["per_target"]["isbi2012"]["top1_regret"] == 0.0  # one source: it is both top-ranked and best
    assert summary["reduced"] is True
    assert summary["as_is"]["isbi2012"]["gerhard_l3_vnc"] == pytest.approx(rows["as_is"]["vi_total"])
    # the table has one line per run
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + 3
