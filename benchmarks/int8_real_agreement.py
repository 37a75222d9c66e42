"""Does int8 ``predict_volume`` still segment real EM like fp32? (issue 18, int8 accuracy check)

For each real data set with instance ground truth (ISBI 2012 test split, gala FIB-SEM test volume),
the bundled zoo package trained on it predicts the split with ``predict_volume`` in fp32 and in int8
(same blocks, windows and frozen intensity rule), each map is segmented per slice with the package's
stored threshold (as ``evaluate`` does), and we report: mean / max absolute probability difference,
the fraction of voxels on the other side of the threshold, the VI between the int8 and the fp32
segmentation, and VI / adapted Rand error of each against the ground truth. Nothing is tuned here.

    NEUROADDA_DATA=/work/shared/em_data python benchmarks/int8_real_agreement.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import neuroadda_rt as nr
from neuroadda_rt.datasets import Dataset, resolve_data_root
from neuroadda_rt.deploy import predict_volume
from neuroadda_rt.evaluation import score_segmentation, stored_threshold
from neuroadda_rt.metrics import variation_of_information
from neuroadda_rt.segmentation import segment

ROOT = Path(__file__).resolve().parents[1]
SETS = {"isbi2012": "test", "gala_fibsem": "test"}  # data set (manifest = zoo package name) -> split


def _per_slice(probs: np.ndarray, threshold: float | None) -> list[np.ndarray]:
    kw = {} if threshold is None else {"threshold": threshold}
    return [np.asarray(segment(p, "boundary", **kw)) for p in probs]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    root = resolve_data_root(args.data_root)
    zoo = {p.name: p for p in nr.default_zoo()}
    zoo_commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", "python/neuroadda_rt/zoo"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    out: dict = {"zoo_commit": zoo_commit, "sets": {}}
    for name, split in SETS.items():
        ds = Dataset.from_json(ROOT / "examples" / "datasets" / f"{name}.json", data_root=root)
        img = np.asarray(ds.image(split)[...])
        gt = ds.labels(split)
        pkg = zoo[name]
        thr = stored_threshold(pkg)
        probs, secs = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for precision in ("fp32", "int8"):
                t0 = time.perf_counter()
                r = predict_volume(pkg, img, Path(tmp) / f"{precision}.zarr", precision=precision, dtype="float32",
                                   scheduler="synchronous", threads=2, progress=False)
                secs[precision] = time.perf_counter() - t0
                probs[precision] = np.asarray(nr.open_volume(Path(tmp) / f"{precision}.zarr")[...])[0]
                assert r.blocks_computed == r.n_blocks
        segs = {k: _per_slice(v, thr) for k, v in probs.items()}
        diff = np.abs(probs["int8"] - probs["fp32"])
        t = 0.5 if thr is None else thr
        vi_pairs = [sum(variation_of_information(a, b, ignore_gt=())) for a, b in zip(segs["int8"], segs["fp32"])]
        scores = {k: [score_segmentation(s, g) for s, g in zip(v, gt)] for k, v in segs.items()}
        row = {"split": split, "shape": list(img.shape), "threshold": thr,
               "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
               "flipped_at_threshold": float(((probs["int8"] > t) != (probs["fp32"] > t)).mean()),
               "vi_int8_vs_fp32_mean": float(np.mean(vi_pairs)), "vi_int8_vs_fp32_max": float(np.max(vi_pairs)),
               "seconds_incl_setup": secs}
        for k, sc in scores.items():
            row[f"{k}_vs_gt"] = {m: float(np.mean([s[m] for s in sc])) for m in ("vi_total", "adapted_rand_error")}
        out["sets"][name] = row
        print(name, json.dumps(row), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
