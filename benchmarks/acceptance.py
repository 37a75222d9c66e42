"""Acceptance of the workflow on the synthetic domain family (issue 5), printed as a README table.

1. Ranking: for every leave-one-out target (each domain of the zoo's family, ranked against the zoo
   without its own model; the held-out demo domain against the whole zoo), is the top-ranked source
   the target's nearest relative in the generating tree (smallest patristic distance among the
   domains that have a model)? Criterion: >= 80% of targets.
2. Fine-tuning: fine-tune the top-ranked source on 4 median-uncertainty tiles and train the same
   network from scratch on the same 4 tiles with the same recipe; VI on held-out tiles. Criterion:
   the VI reduction 1 - VI_finetuned / VI_scratch, averaged over targets and 3 seeds, >= 25%.

Usage::

    python benchmarks/acceptance.py                 # the full measurement (bundled zoo, 3 seeds)
    python benchmarks/acceptance.py --fast          # a quick smoke run (2 targets, 1 seed, few steps)
    python benchmarks/acceptance.py --out acc.json  # also keep every number

Numbers depend on the zoo; the script prints the date, CPU and settings beside the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def nearest_relatives(newick: str, target: str, candidates: list[str]) -> tuple[list[str], dict[str, float]]:
    """The candidates at the smallest patristic distance from ``target`` (ties kept), and all distances."""
    from neuroadda_rt._newick import patristic_distances

    names, d = patristic_distances(newick)
    idx = {n: i for i, n in enumerate(names)}
    if target not in idx:
        raise ValueError(f"{target!r} is not a leaf of the family tree {names}")
    dist = {c: float(d[idx[target], idx[c]]) for c in candidates if c in idx}
    best = min(dist.values())
    return sorted(c for c, v in dist.items() if abs(v - best) <= 1e-9 * max(1.0, best)), dist


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="default", help="zoo folder with family.json (default: bundled zoo)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--targets", type=int, default=None, help="limit the number of targets")
    ap.add_argument("--fast", action="store_true", help="smoke run: 2 targets, 1 seed, the demo's --fast sizes")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the demo preset's)")
    ap.add_argument("--out", default=None, help="write every number as JSON here")
    ap.add_argument("--workdir", default=None, help="keep run directories here (default: a temp dir)")
    args = ap.parse_args(argv)

    from neuroadda_rt._cli._common import open_zoo
    from neuroadda_rt._cli.demo import PRESETS, _zoo_root, domain_style, held_out_name, load_family
    from neuroadda_rt.ranking import _iter_zoo, _pkg_name
    from neuroadda_rt.synthetic import make_domain
    from neuroadda_rt.workflow import run_workflow

    zoo = open_zoo(args.zoo)
    root = Path(args.zoo) if args.zoo != "default" else _zoo_root(zoo)
    fam = load_family(root)
    newick = fam.get("newick") or fam.get("tree")
    models = _iter_zoo(zoo)
    by_name = {_pkg_name(m): m for m in models}
    held = held_out_name(fam)
    targets = sorted(by_name) + ([held] if held not in by_name else [])
    seeds = list(range(args.seeds))
    preset = dict(PRESETS["fast" if args.fast else "full"])
    if args.fast:
        targets, seeds = targets[:2], seeds[:1]
    if args.targets:
        targets = targets[: args.targets]
    train = dict(preset["train"])
    if args.steps is not None:
        train["steps"] = args.steps
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="neuroadda-acceptance-"))

    rows = []
    t_all = time.perf_counter()
    for t in targets:
        sources = [m for n, m in by_name.items() if n != t]
        nearest, _ = nearest_relatives(newick, t, [n for n in by_name if n != t])
        style = domain_style(fam, t)
        for seed in seeds:
            image, labels = make_domain(style, preset["shape"], seed=int(fam.get("demo_seed", 1_000)) + 17 * seed + 1)
            t0 = time.perf_counter()
            res = run_workflow(image, sources, n=4, labels=labels, out_dir=work / f"{t}_s{seed}", strategy="median",
                               n_tiles=preset["n_tiles"], tile_size=preset["tile_size"], pool=preset["pool"],
                               seed=seed, n_permutations=0, train={**train, "seed": seed}, n_test=preset["n_test"],
                               cache_dir=work / "cache", report=False)
            ev = res.evaluation
            vi_ft = ev["finetuned"]["overall"]["vi_total"]
            vi_sc = ev["scratch"]["overall"]["vi_total"]
            row = {"target": t, "seed": seed, "top": res.ranking[0].name, "nearest": nearest,
                   "top_is_nearest": res.ranking[0].name in nearest, "vi_finetuned": vi_ft, "vi_scratch": vi_sc,
                   "vi_source": ev["source"]["overall"]["vi_total"], "reduction": 1.0 - vi_ft / vi_sc,
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"{t} seed {seed}: top {row['top']} (nearest {','.join(nearest)}) "
                  f"VI ft {vi_ft:.3f} scratch {vi_sc:.3f} -> {100 * row['reduction']:.1f}%  "
                  f"[{row['seconds']:.0f} s]", file=sys.stderr, flush=True)

    first = {}
    for r in rows:  # ranking criterion: one vote per target (seed 0's ranking)
        first.setdefault(r["target"], r)
    hit = np.mean([r["top_is_nearest"] for r in first.values()])
    red = float(np.mean([r["reduction"] for r in rows]))
    ratio = 1.0 - float(np.mean([r["vi_finetuned"] for r in rows]) / np.mean([r["vi_scratch"] for r in rows]))
    wall = time.perf_counter() - t_all

    print(f"\nAcceptance on the synthetic family ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"{len(targets)} targets x {len(seeds)} seeds, tiles {preset['tile_size']} px, pool {preset['pool']}, "
          f"training {train or 'zoo recipe'}; {wall / 60:.1f} min)\n")
    print("| target | top-ranked source | nearest relative(s) | top = nearest | VI fine-tuned | VI scratch | VI source as-is | VI reduction |")
    print("|---|---|---|---|---|---|---|---|")
    for t in targets:
        rs = [r for r in rows if r["target"] == t]
        print(f"| {t} | {first[t]['top']} | {', '.join(first[t]['nearest'])} | {'yes' if first[t]['top_is_nearest'] else 'no'} | "
              f"{np.mean([r['vi_finetuned'] for r in rs]):.3f} | {np.mean([r['vi_scratch'] for r in rs]):.3f} | "
              f"{np.mean([r['vi_source'] for r in rs]):.3f} | {100 * np.mean([r['reduction'] for r in rs]):.1f}% |")
    print(f"\nTop-ranked source = nearest relative: {100 * hit:.0f}% of {len(first)} targets "
          f"(criterion >= 80%: {'PASS' if hit >= 0.8 else 'FAIL'})")
    print(f"VI reduction fine-tuned vs scratch, mean over targets x seeds: {100 * red:.1f}% "
          f"(ratio of means: {100 * ratio:.1f}%; criterion >= 25%: {'PASS' if red >= 0.25 else 'FAIL'})")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "top1_nearest": float(hit), "vi_reduction_mean": red,
                                              "vi_reduction_ratio_of_means": ratio, "preset": preset,
                                              "train": train, "wall_s": wall}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
