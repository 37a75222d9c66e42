"""Post hoc analysis for issue 17 (``docs/results.md`` §3.10): could ANY threshold on the monitor's window
statistics catch a switch of data set without alarming on the reference set's own clean stream?

For every ordered pair (A, B) of the five shared sets (their first acquisitions, the protocol's references and
random-weight int8 encoder, ``benchmarks/qc_real_acceptance.py``): the monitor of A is fed A's stream (its clean
windows give the largest clean value of each statistic) and, afresh, B's tiles in order (pure B windows). Reported:
the share of B's windows beyond A's largest clean window (an oracle threshold set with hindsight, zero false
alarms on A's stream), whether one of B's first 3 windows is, and the novelty z-scores against the calibration.

    NEUROADDA_DATA=../shared/em_data python benchmarks/qc_switch_oracle.py --json out.json
    NEUROADDA_DATA=../shared/em_data python benchmarks/qc_switch_oracle.py --noise   # per-section pixel noise

``--noise`` prints each acquisition's per-section pixel noise instead: the robust standard deviation of the
4-neighbour Laplacian over sqrt(20) (for white noise of standard deviation s the Laplacian's is s·sqrt(20)), in
grey levels of 255, which tissue texture barely moves and a change of detector, dose or processing does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qc_real_acceptance as acc  # noqa: E402


def section_noise(section: np.ndarray) -> float:
    """Robust pixel-noise estimate of one section (grey levels): 1.4826 MAD of the 4-neighbour Laplacian / sqrt(20)."""
    x = section.astype(np.float64)
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float(1.4826 * np.median(np.abs(lap - np.median(lap))) / np.sqrt(20))


def main(argv=None) -> int:
    from neuroadda_rt import FeatureExtractor

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("NEUROADDA_DATA", "../shared/em_data")))
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("NEUROADDA_QC_CACHE", "/tmp/neuroadda_qc_real")))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--noise", action="store_true", help="print per-section pixel noise per acquisition and stop")
    args = ap.parse_args(argv)
    if args.noise:
        for name, a in acc.load_acquisitions(args.data).items():
            k = acc.n_reference_sections(len(a["sections"]))
            vals = [section_noise(x) for x in a["sections"]]
            print(f"{name} (reference = first {k}): " + " ".join(f"{v:.0f}" for v in vals))
        return 0
    warnings.simplefilter("ignore")
    args.cache.mkdir(parents=True, exist_ok=True)
    data = acc.prepare(args.data)
    _fp32, int8 = acc.build_encoder(args.cache)
    enc = acc.FeatureCache(FeatureExtractor(int8, backend="onnxruntime", threads=2), args.cache / "features.npz")
    out = {}
    for sa in acc.SETS:
        a = data[acc.FIRST[sa]]
        mon, _ = acc.monitor_for(enc, a, artefact_net=False)  # drift only: the artefact detectors play no part
        st = ~a["ref"]
        clean = a["clean"][st]
        wins = [w for w in mon.update(a["tiles"][st], timestamp=0.0).windows
                if clean[w.index * acc.WINDOW:(w.index + 1) * acc.WINDOW].all()]
        nov_a, mmd_a = np.array([w.novelty for w in wins]), np.array([w.mmd2 for w in wins])
        for sb in acc.SETS:
            if sb == sa:
                continue
            mon, _ = acc.monitor_for(enc, a, artefact_net=False)
            wb = mon.update(data[acc.FIRST[sb]]["tiles"], timestamp=0.0).windows
            nov_b, mmd_b = np.array([w.novelty for w in wb]), np.array([w.mmd2 for w in wb])
            sd = mon._nov_sd
            out[f"{sa}->{sb}"] = {
                "b_windows": len(wb), "a_clean_windows": len(wins),
                "novelty_beyond_clean_max": float((nov_b > nov_a.max()).mean()),
                "mmd2_beyond_clean_max": float((mmd_b > mmd_a.max()).mean()),
                "first3_novelty_beyond": bool((nov_b[:3] > nov_a.max()).any()),
                "first3_mmd2_beyond": bool((mmd_b[:3] > mmd_a.max()).any()),
                "z_b_median": float(np.median((nov_b - mon._nov_mean) / sd)),
                "z_a_clean_max": float((nov_a.max() - mon._nov_mean) / sd),
                "novelty_limit_z": float((mon.novelty_threshold - mon._nov_mean) / sd)}
            acc.log(f"{sa}->{sb}", out[f"{sa}->{sb}"])
    print("| A -> B | B windows | B windows beyond A's largest clean window (novelty / MMD²) | one of B's first 3 "
          "beyond (novelty / MMD²) | novelty z of B, median | largest clean z of A | alarm limit z |")
    print("|---|---|---|---|---|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v['b_windows']} | {v['novelty_beyond_clean_max']:.2f} / {v['mmd2_beyond_clean_max']:.2f} | "
              f"{'yes' if v['first3_novelty_beyond'] else 'no'} / {'yes' if v['first3_mmd2_beyond'] else 'no'} | "
              f"{v['z_b_median']:.1f} | {v['z_a_clean_max']:.1f} | {v['novelty_limit_z']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
