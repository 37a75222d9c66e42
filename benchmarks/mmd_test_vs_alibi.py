"""``mmd2_test`` against alibi-detect's ``MMDDrift``, interleaved over several runs, with the spread.

One pytest-benchmark round of alibi-detect takes ~10 s, so ``bench_mmd.py`` runs it once; a single ratio then
carries whatever the machine was doing at that moment (issue 19 re-measured 15-18x where the README said
24.6x). This script alternates the two, ours then theirs, ``--runs`` times on the same data, checks that both
give the same MMD² and both call the shift, and prints every time, the min / median / max per side, and the
ratio of medians with the range of the paired ratios.

    python benchmarks/mmd_test_vs_alibi.py --runs 5            # n = m = 2048, d = 512 (the README row)
    python benchmarks/mmd_test_vs_alibi.py --n 256 --d 64 --runs 2   # quick check

alibi-detect pins numpy<2: install it with ``pip install --no-deps alibi-detect`` and its light dependencies.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import numpy as np

import neuroadda_rt as nr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ours-permutations", type=int, default=1000)
    ap.add_argument("--alibi-permutations", type=int, default=100)
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from alibi_detect.cd import MMDDrift
    rng = np.random.default_rng(1)
    x = rng.normal(size=(args.n, args.d)).astype(np.float32)
    y = (rng.normal(size=(args.n, args.d)) + 0.05).astype(np.float32)
    sigma = nr.median_sigma(x, y)
    expected = nr.mmd2(x, y, sigma=sigma)

    def ours():
        return nr.mmd2_test(x, y, n_permutations=args.ours_permutations, sigma=sigma, seed=0, device="cpu")

    def theirs():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cd = MMDDrift(x, backend="pytorch", p_val=0.05, sigma=np.array([sigma], dtype=np.float32),
                          configure_kernel_from_x_ref=False, n_permutations=args.alibi_permutations, device="cpu")
            return cd.predict(y)

    ours()  # warm-up: thread pool, first-touch pages
    t_ours, t_theirs = [], []
    for run in range(args.runs):
        t0 = time.perf_counter()
        res = ours()
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = theirs()
        t_theirs.append(time.perf_counter() - t0)
        # same kernel, same unbiased estimator; both must call this shift
        np.testing.assert_allclose(res.mmd2, expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["data"]["distance"], expected, rtol=1e-3, atol=1e-6)
        assert res.p_value <= 0.05 and out["data"]["is_drift"] == 1
        print(f"run {run + 1}: ours {t_ours[-1]:.3f} s ({args.ours_permutations} permutations), "
              f"alibi-detect {t_theirs[-1]:.2f} s ({args.alibi_permutations} permutations), "
              f"ratio {t_theirs[-1] / t_ours[-1]:.1f}x, load {os.getloadavg()[0]:.1f}")
    ratios = sorted(b / a for a, b in zip(t_ours, t_theirs))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; n = m = {args.n}, d = {args.d}")
    for name, t in (("ours", t_ours), ("alibi-detect", t_theirs)):
        print(f"{name:13s} min {min(t):.3f} s  median {statistics.median(t):.3f} s  max {max(t):.3f} s")
    print(f"ratio of medians {statistics.median(t_theirs) / statistics.median(t_ours):.1f}x; "
          f"paired ratios {ratios[0]:.1f}x-{ratios[-1]:.1f}x over {args.runs} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
