"""Old-vs-new benchmark comparison: the same pytest-benchmark files run against an older build of the
package and against this tree, alternately, in one invocation, then one table (old, new, new/old).

The old side is a git worktree of the old commit (its own benchmarks/ files, so each side measures
what its code offered) with the package installed under a separate --target folder::

    git worktree add --detach /tmp/bench_old/src 346aeed
    NEUROADDA_ENABLE_CUDA=OFF .venv/bin/python -m pip install --no-deps --no-build-isolation \\
        --target /tmp/bench_old/site /tmp/bench_old/src     # scikit-build-core + pybind11 in the venv

    python benchmarks/compare_versions.py                    # small (CI) sizes
    NEUROADDA_BENCH_FULL=1 python benchmarks/compare_versions.py --repeats 3

The old runs get ``PYTHONPATH=<old site>`` (ahead of the venv's path to this tree), the new runs
this tree's package; both run with the same interpreter and environment, from the other side's
root so neither picks up the other's conftest. Runs alternate old/new per file and repeat (the
order flips each repeat) so that a machine getting busier does not favour one side. Per benchmark
the table shows the median over repeats of pytest-benchmark's median. The JSON of every run is kept
under --out. Benchmarks present on one side only are listed with "-" on the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["bench_mmd.py", "bench_qc.py", "bench_runtime.py", "bench_uncertainty.py", "bench_metrics.py"]


def run_side(side: str, root: Path, pythonpath: str | None, file: str, out: Path, extra: list[str]) -> Path | None:
    """One pytest-benchmark run of root/benchmarks/file; returns its JSON path (None if the file is missing)."""
    bench = root / "benchmarks" / file
    if not bench.is_file():
        print(f"[{side}] {bench} missing, skipped", flush=True)
        return None
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(bench), "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={out}", "-W", "ignore::pytest.PytestUnknownMarkWarning", *extra]
    print(f"[{side}] {file} -> {out.name}", flush=True)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    print(f"[{side}]   rc={proc.returncode} {tail[0]}", flush=True)
    if proc.returncode not in (0, 5):  # 5: nothing collected / all skipped
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
    return out if out.is_file() else None


def medians(path: Path) -> dict[str, float]:
    """fullname -> median seconds of one pytest-benchmark JSON."""
    data = json.loads(path.read_text())
    return {b["fullname"].split("benchmarks/")[-1]: b["stats"]["median"] for b in data["benchmarks"]}


def table(old: dict[str, list[float]], new: dict[str, list[float]]) -> str:
    def fmt(v):
        return "-" if v is None else f"{v * 1e3:.3f}"

    rows = []
    for name in sorted(set(old) | set(new)):
        o = statistics.median(old[name]) if name in old else None
        n = statistics.median(new[name]) if name in new else None
        ratio = f"{n / o:.2f}" if o and n else "-"
        rows.append((name, fmt(o), fmt(n), ratio))
    head = ("benchmark", "old ms", "new ms", "new/old")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(h.ljust(w[i]) if i == 0 else h.rjust(w[i]) for i, h in enumerate(r)) for r in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-src", type=Path, default=Path("/tmp/bench_old/src"), help="worktree of the old commit")
    ap.add_argument("--old-site", type=Path, default=Path("/tmp/bench_old/site"), help="old package (pip --target)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_old/results"), help="folder for the JSON files")
    ap.add_argument("--files", nargs="+", default=FILES, help="benchmark files (names under benchmarks/)")
    ap.add_argument("--repeats", type=int, default=1, help="old/new pairs per file")
    ap.add_argument("-k", dest="select", default=None, help="pytest -k expression for both sides")
    args = ap.parse_args(argv)
    if not (args.old_site / "neuroadda_rt").is_dir():
        ap.error(f"no old package under {args.old_site} (see the module docstring)")
    size = "full" if os.environ.get("NEUROADDA_BENCH_FULL") == "1" else "small"
    extra = ["-k", args.select] if args.select else []
    old: dict[str, list[float]] = {}
    new: dict[str, list[float]] = {}
    sides = {"old": (args.old_src, str(args.old_site), old), "new": (ROOT, None, new)}
    for file in args.files:
        for r in range(args.repeats):
            for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                root, pythonpath, acc = sides[side]
                path = run_side(side, root, pythonpath, file, args.out / f"{size}_{side}_{Path(file).stem}_{r}.json",
                                extra)
                for name, v in (medians(path) if path else {}).items():
                    acc.setdefault(name, []).append(v)
    print(f"\n{size} sizes, median of {args.repeats} run(s) per side, pytest-benchmark medians")
    print(table(old, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
