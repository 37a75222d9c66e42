"""The real-data transfer benchmark of issue 16 item 1 (protocol: ``docs/results.md`` §5.1, fixed before any run).

Leave-one-dataset-out over the labelled sets of ``../shared/em_data``: each target is ranked against the other
packages of the real-EM zoo (``default_zoo()``) with :func:`~neuroadda_rt.rank_sources`, fine-tuned from every one
of them and trained from scratch (to convergence, with early stopping on validation tiles of the annotation pool)
on ``n`` tiles chosen by :func:`~neuroadda_rt.select_tiles`, and scored by :func:`~neuroadda_rt.evaluate` on 32
held-out tiles of 128 px (gala: 96 px, its slices are 100 px high) at least 10 slices, or one separate image, away
from every tile that can be annotated. Every run writes one JSON under ``OUT/runs``; a rerun skips finished runs.
The table (``results.csv``), the per-target summary (``summary.json``, ``report.md``) and the acceptance lines are
rebuilt from the run files at the end of every invocation (``--report-only``: nothing else).

    python benchmarks/transfer_real.py --out bench_out/transfer_real             # the full protocol (hours on CPU)
    python benchmarks/transfer_real.py --targets gala_fibsem --n 4 --seeds 0 1 --steps 100 --out /tmp/reduced
    python benchmarks/transfer_real.py --device cuda ...                          # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import neuroadda_rt as nr
import numpy as np
from neuroadda_rt import _atomic
from neuroadda_rt._digest import json_sha256
from neuroadda_rt.datasets import Dataset, resolve_data_root
from neuroadda_rt.errors import require
from neuroadda_rt.evaluation import METRICS
from neuroadda_rt.study.experiments.tables import _spearman, summarize
from neuroadda_rt.tiles import extract_tiles, grid_tiles
from neuroadda_rt.training import DEFAULT_FINETUNE_MIX

REPO = Path(__file__).resolve().parents[1]
FORMAT = "neuroadda_rt.transfer_real/1"

#: target -> annotation pool and test region (§5.1). ``pool_z``: the slices of the train split that may be
#: annotated; ``*_z0``: the split's first slice in the original stack (same_stack: the test split is further
#: slices of the same stack, so the slice gap is checked; otherwise it is a separate image).
TARGETS = {
    "isbi2012": {"pool_z": (0, 15), "train_z0": 0, "test_z0": 24, "same_stack": True, "tile": 128},
    "gerhard_l3_vnc": {"pool_z": (0, 7), "train_z0": 0, "test_z0": 16, "same_stack": True, "tile": 128},
    "gala_fibsem": {"pool_z": None, "train_z0": 0, "test_z0": 0, "same_stack": False, "tile": 96},
    "epfl_hippocampus": {"pool_z": None, "train_z0": 0, "test_z0": 0, "same_stack": False, "tile": 128},
}
MIN_SLICE_GAP = 10
NS, SEEDS = (1, 4, 8), (0, 1, 2)
N_TEST, N_VAL, POOL = 32, 8, 512
FT_STEPS, SCRATCH_CHUNK, SCRATCH_MAX, PATIENCE = 200, 200, 3000, 3
ALPHA = 0.05


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def even_pick(coords: np.ndarray, k: int) -> np.ndarray:
    """``k`` of ``coords`` evenly spread over their order (deterministic); all of them when fewer."""
    if len(coords) <= k:
        return coords
    return coords[np.linspace(0, len(coords) - 1, k).round().astype(int)]


def load_target(name: str, data_root, *, n_test: int = N_TEST) -> dict:
    """The target's annotation pool, its test tiles and where both lie in the original stack."""
    spec = TARGETS[name]
    ds = Dataset.from_json(REPO / "examples" / "datasets" / f"{name}.json", data_root=data_root)
    img, lab = np.asarray(ds.image("train")[...]), np.asarray(ds.labels("train"))
    z0, z1 = spec["pool_z"] or (0, img.shape[0])
    pool_img, pool_lab = np.ascontiguousarray(img[z0:z1]), np.ascontiguousarray(lab[z0:z1])
    test_img, test_lab = np.asarray(ds.image("test")[...]), np.asarray(ds.labels("test"))
    t = int(spec["tile"])
    coords = even_pick(np.asarray(grid_tiles(test_img.shape, t), dtype=np.int64), n_test)
    return {"name": name, "tile": t, "pool_img": pool_img, "pool_lab": pool_lab,
            "pool_z_abs": [spec["train_z0"] + z0 + i for i in range(len(pool_img))],
            "test_coords": coords, "test_z_abs": [spec["test_z0"] + int(c[0]) for c in coords],
            "test_img": extract_tiles(test_img, coords, t), "test_lab": extract_tiles(test_lab, coords, t),
            "same_stack": spec["same_stack"], "voxel_size_nm": ds.voxel_size_nm}


def validation_tiles(tgt: dict, chosen: np.ndarray, k: int = N_VAL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``k`` labelled grid tiles of the annotation pool that overlap none of the chosen tiles (scratch's early
    stopping; never the test region)."""
    t = tgt["tile"]
    grid = np.asarray(grid_tiles(tgt["pool_img"].shape, t), dtype=np.int64)
    keep = [c for c in grid if not any(c[0] == o[0] and abs(c[1] - o[1]) < t and abs(c[2] - o[2]) < t
                                       for o in chosen)]
    coords = even_pick(np.asarray(keep, dtype=np.int64).reshape(-1, 3), k)
    return extract_tiles(tgt["pool_img"], coords, t), extract_tiles(tgt["pool_lab"], coords, t), coords


def sources_for(target: str) -> dict[str, object]:
    return {p.name: p for p in nr.default_zoo() if p.name != target}


# --------------------------------------------------------------------------------------------
# ranking and runs
# --------------------------------------------------------------------------------------------
def ranking(tgt: dict, out: Path, device: str, only=None) -> list[dict]:
    """``rank_sources`` of the other zoo packages (``only`` these, for reduced runs) on the annotation pool
    (cached per target and source set)."""
    srcs = {k: v for k, v in sources_for(tgt["name"]).items() if only is None or k in only}
    path = out / "rankings" / f"{tgt['name']}__{json_sha256(sorted(srcs))[:8]}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))["entries"]
    r = nr.rank_sources(tgt["pool_img"], list(srcs.values()), tile_size=tgt["tile"], seed=0, cache_dir=False,
                        device=device, target_voxel_size_nm=tgt["voxel_size_nm"])
    entries = [{"source": e.name, "rank": i + 1, "mmd2": float(e.mmd2), "p_value": float(e.p_value)}
               for i, e in enumerate(r)]
    _atomic.write_json(path, {"target": tgt["name"], "entries": entries, "warnings": list(r.warnings)})
    return entries


def _score(model, tgt: dict, device: str) -> dict:
    ev = nr.evaluate(model, tgt["test_img"], tgt["test_lab"], device=device)
    return {**{m: float(ev.overall[m]) for m in METRICS}, "threshold": float(ev.threshold),
            "tile_vi": [float(r["vi_total"]) for r in ev.per_image],
            "tile_are": [float(r["adapted_rand_error"]) for r in ev.per_image],
            "tile_truth_segments": [int(r["n_truth"]) for r in ev.per_image]}


def _train_scratch(tgt, selector, tiles, labels, chosen, *, seed, args, work: Path) -> tuple[object, list[dict]]:
    """Scratch to convergence (§5.1): chunks of training, VI on validation tiles after each, early stopping."""
    vimg, vlab, _ = validation_tiles(tgt, chosen)
    kw = {"lr": 3e-4, "batch_size": 8, "patch_size": tgt["tile"], "device": args.device, "overwrite": True}
    curve, best, best_vi, since, prev = [], None, math.inf, 0, None
    for k in range(max(1, args.scratch_max // args.scratch_chunk)):
        dest = work / f"chunk{k}"
        if prev is None:
            m = nr.train_from_scratch(selector, tiles, labels, steps=args.scratch_chunk, seed=seed, out=dest, **kw)
        else:
            m = nr.finetune(prev, tiles, labels, steps=args.scratch_chunk, seed=1000 * seed + k, out=dest,
                            mix=1.0, **kw)  # a chunk continues the previous one: no interpolation
        vi = float(nr.evaluate(m, vimg, vlab, device=args.device).overall["vi_total"])
        curve.append({"steps": (k + 1) * args.scratch_chunk, "val_vi": vi,
                      "loss": float(np.mean(m.history.loss[-10:])) if m.history.loss else None})
        if vi < best_vi:
            best, best_vi, since = m, vi, 0
        else:
            since += 1
        prev = m
        if since >= args.patience:
            break
    return best, curve


def plan(targets, ns, seeds) -> list[dict]:
    """Every run of the protocol (as-is, every source and scratch at every n and seed)."""
    runs = []
    for t in targets:
        for s in sources_for(t):
            runs.append({"target": t, "init": s, "n": 0, "seed": 0})
        for n in ns:
            for seed in seeds:
                for init in [*sources_for(t), "scratch"]:
                    runs.append({"target": t, "init": init, "n": n, "seed": seed})
    return runs


def run_settings(run: dict, args) -> dict:
    """The settings a run's result depends on: a fine-tuned run does not change with the scratch bounds, so a
    longer scratch bound reruns only the scratch runs."""
    common = {"n_test": args.n_test, "pool": args.pool}
    if run["init"] == "scratch":
        return {**common, "chunk": args.scratch_chunk, "max": args.scratch_max, "patience": args.patience}
    # §5.1-5.8 ran plain fine-tuning (mix 1) before it had a name: its run ids stay as they were
    mix = getattr(args, "mix", 1.0)
    return {**common, "steps": args.steps, **({"mix": mix} if mix != 1.0 else {})}


def run_id(run: dict, args) -> str:
    return f"{run['target']}__{run['init']}__n{run['n']}__s{run['seed']}__{json_sha256(run_settings(run, args))[:8]}"


def execute(run: dict, tgt: dict, ranks: list[dict], args, out: Path) -> dict:
    """One run, its row written atomically to ``out/runs`` (skipped when there)."""
    rid = run_id(run, args)
    path = out / "runs" / f"{rid}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    srcs = sources_for(tgt["name"])
    by = {e["source"]: e for e in ranks}
    top = ranks[0]["source"]
    row = {"run_id": rid, "target": tgt["name"], "init": run["init"], "n": run["n"], "seed": run["seed"],
           "strategy": "median", "tile_size": tgt["tile"], "best_source": top,
           "is_best_source": run["init"] == top,
           "source_rank": by[run["init"]]["rank"] if run["init"] in by else None,
           "mmd2": by[run["init"]]["mmd2"] if run["init"] in by else None}
    if run["n"] == 0:
        row.update(init_kind="as_is", tile_coords=[], **_score(srcs[run["init"]], tgt, args.device))
    else:
        selector = srcs[top if run["init"] == "scratch" else run["init"]]
        sel = nr.select_tiles(tgt["pool_img"], selector, run["n"], strategy="median", pool=args.pool,
                              tile_size=tgt["tile"], seed=run["seed"], device=args.device)
        coords = np.asarray(sel.coords, dtype=np.int64)
        labels = extract_tiles(tgt["pool_lab"], coords, tgt["tile"])
        work = out / "work" / rid
        if run["init"] == "scratch":
            model, curve = _train_scratch(tgt, selector, sel.tiles, labels, coords, seed=run["seed"], args=args,
                                          work=work)
            row.update(init_kind="scratch", scratch_curve=curve,
                       steps=curve[int(np.argmin([c["val_vi"] for c in curve]))]["steps"])
        else:
            model = nr.finetune(srcs[run["init"]], sel.tiles, labels, steps=args.steps, lr=3e-4, batch_size=8,
                                patch_size=tgt["tile"], seed=run["seed"], device=args.device, out=work / "model",
                                overwrite=True, mix=args.mix)
            row.update(init_kind="source", steps=args.steps, mix=args.mix)
        row.update(tile_coords=[[int(c[0]) + tgt["pool_z_abs"][0], int(c[1]), int(c[2])] for c in coords],
                   **_score(model, tgt, args.device))
        shutil.rmtree(work, ignore_errors=True)
    row.update(test_coords=[[z, int(c[1]), int(c[2])] for z, c in zip(tgt["test_z_abs"], tgt["test_coords"])],
               same_stack=tgt["same_stack"], wall_seconds=round(time.perf_counter() - t0, 2),
               finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _atomic.write_json(path, row)
    return row


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def friedman(g) -> dict:
    """Do the sources differ at all? Friedman test, blocks = (test tile, seed), treatments = sources."""
    from scipy.stats import friedmanchisquare
    src = g[g.init_kind == "source"]
    seeds = sorted(set(src.seed))
    vals = {}
    for s, gs in src.groupby("init"):
        if sorted(gs.seed) != seeds:
            return {"statistic": None, "p_value": None, "reason": f"source {s} lacks some seeds"}
        vals[s] = np.concatenate([gs[gs.seed == k].tile_vi.iloc[0] for k in seeds])
    if len(vals) < 3:
        return {"statistic": None, "p_value": None, "reason": f"{len(vals)} sources: the test needs >= 3"}
    res = friedmanchisquare(*vals.values())
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), "n_blocks": len(next(iter(vals.values()))),
            "sources_differ": bool(res.pvalue < ALPHA)}


def versus_scratch(g, source: str) -> dict:
    """Is ``source`` better than scratch beyond the noise? Wilcoxon signed-rank test over the (test tile, seed)
    pairs, two-sided, on VI(scratch) - VI(source); the seeds both runs have."""
    from scipy.stats import wilcoxon
    src, scr = g[g.init == source], g[g.init_kind == "scratch"]
    seeds = sorted(set(src.seed) & set(scr.seed))
    if not seeds:
        return {"p_value": None, "reason": "no scratch run shares a seed with the source"}
    diff = np.concatenate([np.asarray(scr[scr.seed == k].tile_vi.iloc[0]) - np.asarray(src[src.seed == k].tile_vi.iloc[0])
                           for k in seeds])
    if not np.any(diff):
        return {"p_value": 1.0, "n_pairs": len(diff), "median_vi_gain": 0.0, "source_better": False}
    res = wilcoxon(diff)
    return {"p_value": float(res.pvalue), "n_pairs": len(diff), "median_vi_gain": float(np.median(diff)),
            "source_better": bool(res.pvalue < ALPHA and np.median(diff) > 0)}


def per_target(g) -> dict:
    """ρ (mean over seeds, and per seed), top-1 regret with the seed SD, Friedman, for one target at one n."""
    src = g[g.init_kind == "source"]
    mean = src.groupby("init").agg(vi=("vi_total", "mean"), rank=("source_rank", "first"))
    per_seed = [_spearman(gs.source_rank, gs.vi_total) for _, gs in src.groupby("seed")]
    var = src.groupby("init").vi_total.var(ddof=1)
    seed_sd = float(np.sqrt(var.mean())) if var.notna().all() and len(var) else float("nan")
    top = mean["rank"].idxmin()
    regret = float(mean.vi[top] - mean.vi.min())
    return {"n_sources": len(mean), "n_seeds": int(src.seed.nunique()), "spearman_rho": _spearman(mean["rank"], mean.vi),
            "spearman_rho_per_seed": per_seed,
            "spearman_rho_seed_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan"),
            "top_ranked": str(top), "best": str(mean.vi.idxmin()),
            "mean_vi": {k: float(v) for k, v in mean.vi.items()}, "top1_regret": regret, "seed_sd": seed_sd,
            "friedman": friedman(g),
            "top_vs_scratch": versus_scratch(g, str(top)) if (g.init_kind == "scratch").any() else None}


def report(out: Path, *, reduced: bool, args=None) -> dict:
    pd = require("pandas", "report")
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "runs").glob("*.json"))]
    if args is not None:  # only the runs of these settings (a capped scratch run stays on disk, out of the table)
        rows = [r for r in rows if r["run_id"] == run_id(r, args)]
    table = pd.DataFrame(rows)
    summary: dict = {"format": FORMAT, "reduced": reduced, "n_runs": len(rows), "by_n": {}}
    if not len(table):
        _atomic.write_json(out / "summary.json", summary)
        return summary
    flat = table.drop(columns=[c for c in ("tile_vi", "tile_are", "tile_truth_segments", "tile_coords",
                                           "test_coords", "scratch_curve") if c in table])
    flat = flat.sort_values(["target", "n", "seed", "init"]).reset_index(drop=True)
    _atomic.write_bytes(out / "results.csv", flat.to_csv(index=False).encode())
    trained = table[table.n > 0]
    for n, gn in trained.groupby("n"):
        base = summarize(gn)  # the study runner's ρ (per target, pooled) and VI reduction vs scratch
        summary["by_n"][int(n)] = {"pooled_spearman_rho": base.get("spearman", {}).get("pooled"),
                                   "vi_reduction_vs_scratch": base.get("vi_reduction_vs_scratch", {}),
                                   "per_target": {t: per_target(g) for t, g in gn.groupby("target")
                                                  if (g.init_kind == "source").any()}}
    summary["as_is"] = {t: {r.init: float(r.vi_total) for r in g.itertuples()}
                        for t, g in table[table.n == 0].groupby("target")}
    summary["scratch_curves"] = {r.run_id: r.scratch_curve for r in table[table.init_kind == "scratch"].itertuples()}
    summary["test_tile_truth_segments"] = {t: g.tile_truth_segments.iloc[0] for t, g in table.groupby("target")}
    summary["acceptance"] = acceptance(summary)
    _atomic.write_json(out / "summary.json", summary)
    _atomic.write_bytes(out / "report.md", render(summary).encode())
    return summary


def acceptance(summary: dict) -> dict:
    s4 = summary["by_n"].get(4)
    if s4 is None:
        return {"note": "no n = 4 runs"}
    rho = s4["pooled_spearman_rho"]
    regret_ok = {t: bool(v["top1_regret"] <= 0.1 or v["top1_regret"] <= v["seed_sd"])
                 for t, v in s4["per_target"].items()}
    red = s4["vi_reduction_vs_scratch"]
    red_ok = {t: bool(red[t]["mean_percent"] >= 25.0) if t in red else None for t in s4["per_target"]}  # None: no scratch
    return {"pooled_rho_ge_0.6": {"value": rho, "pass": bool(rho is not None and np.isfinite(rho) and rho >= 0.6)},
            "top1_regret_every_target": {"per_target": regret_ok, "pass": bool(regret_ok) and all(regret_ok.values())},
            "vi_reduction_ge_25_every_target": {"per_target": red_ok, "pass": None if None in red_ok.values() else
                                                bool(red_ok) and all(red_ok.values())}}


def _p(test: dict | None) -> str:
    return "n/a" if not test or test.get("p_value") is None else f"{test['p_value']:.3g} (n = {test['n_pairs']})"


def render(summary: dict) -> str:
    lines = [f"# Real-data transfer benchmark{' (REDUCED: not the acceptance run)' if summary['reduced'] else ''}", ""]
    for n, s in sorted(summary["by_n"].items()):
        rho = s["pooled_spearman_rho"]
        lines += [f"## n = {n} (pooled ρ {'n/a' if rho is None else f'{rho:.3f}'})", "",
                  ("| target | ρ | ρ seed SD | top-ranked | best | regret | seed SD | Friedman p | VI red. vs scratch "
                   "| top vs scratch, Wilcoxon p |"),
                  "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
        for t, v in sorted(s["per_target"].items()):
            r = s["vi_reduction_vs_scratch"].get(t)
            fp = v["friedman"]["p_value"]
            red = "n/a" if r is None else f"{r['mean_percent']:.0f} ± {r['sd_percent']:.0f} %"
            lines.append(f"| {t}{' (96-px tiles)' if t == 'gala_fibsem' else ''} | {v['spearman_rho']:.2f} | "
                         f"{v['spearman_rho_seed_sd']:.2f} | {v['top_ranked']} | {v['best']} | {v['top1_regret']:.3f} | "
                         f"{v['seed_sd']:.3f} | {'n/a' if fp is None else f'{fp:.3g}'} | "
                         f"{red} | {_p(v.get('top_vs_scratch'))} |")
        lines.append("")
    acc = summary.get("acceptance", {})
    for key, v in acc.items():
        if isinstance(v, dict):
            verdict = "NOT RUN (runs missing)" if v["pass"] is None else "PASS" if v["pass"] else "FAIL"
            lines.append(f"- {key}: {verdict} {json.dumps({k: x for k, x in v.items() if k != 'pass'})}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--n", nargs="+", type=int, default=list(NS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--steps", type=int, default=FT_STEPS, help="fine-tuning steps")
    ap.add_argument("--mix", type=float, default=DEFAULT_FINETUNE_MIX,
                    help="finetune's weight interpolation (default: the product's, 0.5 since §5.9; "
                         "1 = plain fine-tuning, as §5.1-5.8 ran and as docs/results/transfer_real_n4 holds)")
    ap.add_argument("--scratch-chunk", type=int, default=SCRATCH_CHUNK)
    ap.add_argument("--scratch-max", type=int, default=SCRATCH_MAX)
    ap.add_argument("--patience", type=int, default=PATIENCE)
    ap.add_argument("--n-test", type=int, default=N_TEST)
    ap.add_argument("--pool", type=int, default=POOL, help="candidate tiles scored by select_tiles")
    ap.add_argument("--sources", nargs="+", default=None, help="only these sources (reduced runs)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    root = resolve_data_root(args.data_root)
    reduced = (sorted(args.targets) != sorted(TARGETS) or sorted(args.n) != sorted(NS) or sorted(args.seeds) != sorted(SEEDS)
               or args.steps != FT_STEPS or args.scratch_chunk != SCRATCH_CHUNK or args.scratch_max != SCRATCH_MAX
               or args.patience != PATIENCE or args.n_test != N_TEST or args.pool != POOL or args.sources is not None)
    args.out.mkdir(parents=True, exist_ok=True)
    _atomic.write_json(args.out / "settings.json", {**{k: (str(v) if isinstance(v, Path) else v)
                                                       for k, v in vars(args).items()}, "reduced": reduced})
    if not args.report_only:
        runs = plan(args.targets, args.n, args.seeds)
        if args.sources is not None:
            runs = [r for r in runs if r["init"] in args.sources or r["init"] == "scratch"]
        # every target's fine-tuned runs before any scratch run: a scratch run costs several of them, so a
        # stopped invocation leaves the most complete rankings behind (and resumes anyway)
        loaded: dict = {}
        for scratch_pass in (False, True):
            for t in args.targets:
                mine = [r for r in runs if r["target"] == t and (r["init"] == "scratch") == scratch_pass]
                if not mine:
                    continue
                if t not in loaded:
                    tgt = load_target(t, root, n_test=args.n_test)
                    loaded[t] = (tgt, ranking(tgt, args.out, args.device, args.sources))
                tgt, ranks = loaded[t]
                for i, r in enumerate(mine):
                    print(f"[{time.strftime('%H:%M:%S')}] {t} {'scratch' if scratch_pass else 'sources'} "
                          f"{i + 1}/{len(mine)}: {r['init']} n={r['n']} seed={r['seed']}", file=sys.stderr, flush=True)
                    execute(r, tgt, ranks, args, args.out)
    summary = report(args.out, reduced=reduced, args=args)
    print((args.out / "report.md").read_text(encoding="utf-8") if (args.out / "report.md").exists() else
          json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
