"""``neuroadda-rt selfcheck``: print what was built and run every compiled kernel once."""

from __future__ import annotations

import time

import numpy as np

from ._common import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser("selfcheck", help="print build_info() and run each kernel on small inputs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def run(args) -> int:
    import neuroadda_rt as nr

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)).astype(np.float32)
    y = (rng.normal(size=(200, 64)) + 0.25).astype(np.float32)
    probs = rng.uniform(size=(8, 2, 64, 64)).astype(np.float32)
    seg = rng.integers(0, 20, size=(32, 64, 64), dtype=np.uint64)
    gt = rng.integers(0, 20, size=(32, 64, 64), dtype=np.uint32)
    results = {"build_info": nr.build_info(), "kernels": {}}
    checks = {
        "mmd2": lambda: float(nr.mmd2(x, y)),
        "mmd2_test": lambda: float(nr.mmd2_test(x, y, n_permutations=200).p_value),
        "tile_uncertainty": lambda: float(nr.tile_uncertainty(probs).mean()),
        "variation_of_information": lambda: [float(v) for v in nr.variation_of_information(seg, gt)],
        "adapted_rand_error": lambda: [float(v) for v in nr.adapted_rand_error(seg, gt)],
    }
    for name, fn in checks.items():
        value, ms = _timed(fn)
        results["kernels"][name] = {"value": value, "ms": round(ms, 3)}
    if args.json:
        print_json(results)
        return 0
    for key, value in results["build_info"].items():
        print(f"{key:>20}: {value}")
    print()
    for name, r in results["kernels"].items():
        print(f"{name:>26}: {r['value']}  ({r['ms']:.2f} ms)")
    return 0
