"""How long should a real source be fine-tuned? (issue 16; protocol: ``docs/results.md`` §5.8, fixed before any run).

For every target and source of the real-data transfer benchmark (``transfer_real.py``, §5.1) at n = 4 and seeds
0-2, fine-tune in chunks of 200 steps up to 1200 and score after every chunk (and at step 0: the source as-is with
the threshold tuned on the annotated tiles) on the 8 validation tiles of the annotation pool and on the 32 fixed
test tiles. The step count is then chosen leave-one-target-out on the validation curves of the other targets, and
the test VI is read there. One JSON per run under ``OUT/runs`` (a rerun skips finished runs); ``report.md`` and
``summary.json`` are rebuilt at the end of every invocation.

    python benchmarks/finetune_length.py --out bench_out/finetune_length --check bench_out/transfer_real
    python benchmarks/finetune_length.py --out bench_out/finetune_length --report-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import neuroadda_rt as nr
import numpy as np
from neuroadda_rt import _atomic
from neuroadda_rt.datasets import resolve_data_root
from neuroadda_rt.study.experiments.tables import _spearman
from neuroadda_rt.tiles import extract_tiles
from neuroadda_rt.training import _normalise_all, _split_pairs, _tune_threshold

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer_real as tr  # noqa: E402  (the benchmark this one extends: same targets, tiles and ranking)

FORMAT = "neuroadda_rt.finetune_length/1"
N, SEEDS, CHUNK, MAX_STEPS, LR, BATCH = 4, (0, 1, 2), 200, 1200, 3e-4, 8
PRODUCT_STEPS = 200
CANDIDATES = tuple(range(CHUNK, MAX_STEPS + 1, CHUNK))  # the default may become one of these (not 0)
#: §5.5's converged scratch, test VI at n = 4 per seed 0, 1, 2 (not rerun here)
SCRATCH_VI = {"epfl_hippocampus": (0.571, 0.362, 0.662), "gala_fibsem": (0.857, 1.143, 0.968),
              "gerhard_l3_vnc": (0.180, 0.269, 0.314), "isbi2012": (0.908, 0.376, 0.649)}
ALPHA = 0.05


def plan(targets, ranks_of) -> list[dict]:
    """Top-ranked source of every target first (all seeds), then the other sources."""
    first, rest = [], []
    for t in targets:
        top = ranks_of[t][0]["source"]
        for s in tr.sources_for(t):
            for seed in SEEDS:
                (first if s == top else rest).append({"target": t, "init": s, "seed": seed})
    return first + rest


def annotated_tiles(tgt: dict, src, seed: int, device: str):
    """§5.1's annotated tiles of a run (``select_tiles`` with the run's source and seed), their labels, their
    coordinates and the 8 validation tiles of the pool that overlap none of them."""
    sel = nr.select_tiles(tgt["pool_img"], src, N, strategy="median", pool=tr.POOL, tile_size=tgt["tile"],
                          seed=seed, device=device)
    coords = np.asarray(sel.coords, dtype=np.int64)
    labels = extract_tiles(tgt["pool_lab"], coords, tgt["tile"])
    vimg, vlab, _ = tr.validation_tiles(tgt, coords)
    return sel.tiles, labels, coords, vimg, vlab


def threshold_on_annotated(net, tiles, labels, package) -> float:
    """The product's threshold rule (VI on the annotated tiles, un-augmented) for ``net`` with ``package``'s
    intensity rule and head."""
    ims, lbs = _split_pairs(tiles, labels)
    return _tune_threshold(net, _normalise_all(ims, package.normalization), lbs, package.config["head"])["threshold"]


def _scores(model, tgt, vimg, vlab, device, threshold=None) -> dict:
    val = nr.evaluate(model, vimg, vlab, threshold=threshold, device=device)
    test = nr.evaluate(model, tgt["test_img"], tgt["test_lab"], threshold=threshold, device=device)
    return {"val_vi": float(val.overall["vi_total"]), "test_vi": float(test.overall["vi_total"]),
            "threshold": float(test.threshold), "tile_vi": [float(r["vi_total"]) for r in test.per_image]}


def execute(run: dict, tgt: dict, ranks: list[dict], out: Path, device: str, check: Path | None) -> dict:
    rid, path = run_file(run, out)
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    src = tr.sources_for(tgt["name"])[run["init"]]
    tiles, labels, coords, vimg, vlab = annotated_tiles(tgt, src, run["seed"], device)
    # step 0: the source as-is, its threshold re-tuned on the annotated tiles (the product's rule, no training)
    th0 = threshold_on_annotated(src.unet().eval(), tiles, labels, src)
    curve = [{"steps": 0, **_scores(src, tgt, vimg, vlab, device, threshold=th0)}]
    work, prev = out / "work" / rid, src
    for k in range(1, MAX_STEPS // CHUNK + 1):
        m = nr.finetune(prev, tiles, labels, steps=CHUNK, lr=LR, batch_size=BATCH, patch_size=tgt["tile"],
                        seed=run["seed"] if k == 1 else 1000 * run["seed"] + k, device=device,
                        out=work / f"chunk{k}", overwrite=True, mix=1.0)  # plain, as §5.8 ran
        curve.append({"steps": k * CHUNK, "loss": float(np.mean(m.history.loss[-10:])),
                      **_scores(m, tgt, vimg, vlab, device)})
        if k == 1 and check is not None:
            _check_product_run(check, run, curve[-1])
        if k > 1:
            shutil.rmtree(work / f"chunk{k - 1}", ignore_errors=True)
        prev = m
    shutil.rmtree(work, ignore_errors=True)
    return save_run(path, rid, run, tgt, ranks, coords, t0, curve=curve)


def run_file(run: dict, out: Path) -> tuple[str, Path]:
    """A run's id and the JSON file that holds it once done (the runs are resumable)."""
    rid = f"{run['target']}__{run['init']}__n{N}__s{run['seed']}"
    return rid, out / "runs" / f"{rid}.json"


def save_run(path: Path, rid: str, run: dict, tgt: dict, ranks: list[dict], coords, t0: float, **results) -> dict:
    """Write a finished run's row (what identifies it, its tiles and timing, then ``results``) atomically."""
    by = {e["source"]: e for e in ranks}
    row = {"run_id": rid, "target": tgt["name"], "init": run["init"], "seed": run["seed"], "n": N,
           "source_rank": by[run["init"]]["rank"], "top_ranked": ranks[0]["source"],
           "tile_coords": coords.tolist(), **results, "wall_seconds": round(time.perf_counter() - t0, 1),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _atomic.write_json(path, row)
    return row


def _check_product_run(check: Path, run: dict, first: dict) -> None:
    """Chunk 1 is the product's 200-step run: its test VI must equal the transfer benchmark's row."""
    settings = argparse.Namespace(n_test=tr.N_TEST, pool=tr.POOL, steps=PRODUCT_STEPS, mix=1.0)  # §5.1's run
    path = check / "runs" / f"{tr.run_id({**run, 'n': N}, settings)}.json"
    if not path.exists():
        print(f"  (no transfer_real row to check {run['target']} {run['init']} seed {run['seed']} against)",
              file=sys.stderr)
        return
    ref = json.loads(path.read_text(encoding="utf-8"))["vi_total"]
    if abs(ref - first["test_vi"]) > 1e-9:
        raise SystemExit(f"chunk 1 of {run} gave test VI {first['test_vi']!r}, the product's run {ref!r}: "
                         "not the same run, stopping (§5.8)")


# --------------------------------------------------------------------------------------------------
def _val_by_steps(rows, targets) -> dict[int, float]:
    """Validation VI per step count: mean over runs within a target, then over the given targets."""
    per_t = []
    for t in targets:
        rt = [r for r in rows if r["target"] == t]
        if rt:
            per_t.append({c["steps"]: np.mean([_at(r, c["steps"])["val_vi"] for r in rt]) for c in rt[0]["curve"]})
    return {s: float(np.mean([p[s] for p in per_t])) for s in per_t[0]} if per_t else {}


def _at(row, steps) -> dict:
    return next(c for c in row["curve"] if c["steps"] == steps)


def summarize(rows: list[dict]) -> dict:
    from scipy.stats import rankdata, wilcoxon

    targets = sorted({r["target"] for r in rows})
    out: dict = {"format": FORMAT, "n_runs": len(rows), "targets": {}}
    all_val = _val_by_steps(rows, targets)
    out["val_vi_by_steps_all_targets"] = all_val
    cand = {s: v for s, v in all_val.items() if s in CANDIDATES}
    out["s_star_all"] = int(min(cand, key=cand.get)) if cand else None
    diffs = []
    for t in targets:
        others = [o for o in targets if o != t]
        val_o = {s: v for s, v in _val_by_steps(rows, others).items() if s in CANDIDATES}
        s_t = int(min(val_o, key=val_o.get)) if val_o else None
        rt = [r for r in rows if r["target"] == t]
        top = rt[0]["top_ranked"]
        entry = {"s_star_loto": s_t, "val_vi_other_targets": val_o, "sources": {}}
        for s in sorted({r["init"] for r in rt}):
            rs = sorted([r for r in rt if r["init"] == s], key=lambda r: r["seed"])
            own_best = [min(r["curve"], key=lambda c: c["val_vi"]) for r in rs]
            e = {"rank": rs[0]["source_rank"], "seeds": [r["seed"] for r in rs],
                 "test_vi_by_steps": {c["steps"]: float(np.mean([_at(r, c["steps"])["test_vi"] for r in rs]))
                                      for c in rs[0]["curve"]},
                 "test_vi_at_0": [_at(r, 0)["test_vi"] for r in rs],
                 "test_vi_at_200": [_at(r, PRODUCT_STEPS)["test_vi"] for r in rs],
                 "test_vi_at_s_star": [_at(r, s_t)["test_vi"] for r in rs] if s_t else None,
                 "own_best_val_steps": [c["steps"] for c in own_best],
                 "test_vi_at_own_best_val": [c["test_vi"] for c in own_best]}
            if s == top and s_t:
                red = {}
                for key in ("test_vi_at_200", "test_vi_at_s_star", "test_vi_at_own_best_val"):
                    pct = [100 * (SCRATCH_VI[t][r["seed"]] - v) / SCRATCH_VI[t][r["seed"]]
                           for r, v in zip(rs, e[key])]
                    red[key] = {"mean_percent": float(np.mean(pct)),
                                "sd_percent": float(np.std(pct, ddof=1)) if len(pct) > 1 else float("nan"),
                                "seeds": len(pct)}
                e["vi_reduction_vs_scratch"] = red
                for r in rs:
                    diffs.append(np.asarray(_at(r, PRODUCT_STEPS)["tile_vi"]) - np.asarray(_at(r, s_t)["tile_vi"]))
            entry["sources"][s] = e
        entry["top_ranked"] = top
        out["targets"][t] = entry
    # pooled ρ at 200 and at S*(t), where every source of a target has its three seeds
    for key in ("test_vi_at_200", "test_vi_at_s_star"):
        ranks, vis = [], []
        for t, e in out["targets"].items():
            srcs = e["sources"]
            if len(srcs) == 3 and all(len(v["seeds"]) == len(SEEDS) and v[key] for v in srcs.values()):
                # ranks within each target, pooled over targets (as transfer_real.py / tables.summarize pool)
                ranks += [float(v["rank"]) for v in srcs.values()]
                vis += list(rankdata([float(np.mean(v[key])) for v in srcs.values()]))
        out[f"pooled_rho_{key}"] = _spearman(ranks, vis) if len(ranks) >= 6 else None
        out[f"pooled_rho_{key}_targets"] = len(ranks) // 3
    if diffs:
        d = np.concatenate(diffs)
        res = wilcoxon(d) if np.any(d) else None
        out["loto_vs_200_top_ranked"] = {"pairs": int(d.size), "mean_vi_gain": float(d.mean()),
                                         "p_value": float(res.pvalue) if res else 1.0}
        complete = (len(diffs) == len(SEEDS) * 4)
        adopt = (complete and out["s_star_all"] not in (None, PRODUCT_STEPS) and res is not None
                 and res.pvalue < ALPHA and d.mean() > 0)
        out["rule"] = {"complete": complete, "adopt": bool(adopt), "new_default_steps": out["s_star_all"] if adopt
                       else PRODUCT_STEPS}
    return out


def render(s: dict) -> str:
    lines = ["# Fine-tuning length on real data (§5.8)", "",
             f"Runs: {s['n_runs']}. Validation VI by steps, mean over targets: "
             + ", ".join(f"{k}: {v:.3f}" for k, v in s["val_vi_by_steps_all_targets"].items())
             + f". S*(all) = {s['s_star_all']}.", "",
             "| target | S*(t) (other targets) | source (rank) | seeds | test VI at 0 / 200 / S*(t) / own best val | "
             "own best val steps | VI red. vs scratch at 200 / S*(t) / own best |", "|---|---:|---|---:|---|---|---|"]
    for t, e in s["targets"].items():
        for src, v in sorted(e["sources"].items(), key=lambda kv: kv[1]["rank"]):
            m = lambda xs: "n/a" if not xs else f"{np.mean(xs):.3f}"  # noqa: E731
            red = v.get("vi_reduction_vs_scratch")
            red_s = " / ".join(f"{red[k]['mean_percent']:.0f} ± {red[k]['sd_percent']:.0f} %" for k in
                               ("test_vi_at_200", "test_vi_at_s_star", "test_vi_at_own_best_val")) if red else ""
            lines.append(f"| {t} | {e['s_star_loto']} | {src} ({v['rank']}) | {len(v['seeds'])} | "
                         f"{m(v['test_vi_at_0'])} / {m(v['test_vi_at_200'])} / {m(v['test_vi_at_s_star'])} / "
                         f"{m(v['test_vi_at_own_best_val'])} | {v['own_best_val_steps']} | {red_s} |")
    lines.append("")
    for key in ("test_vi_at_200", "test_vi_at_s_star"):
        rho = s.get(f"pooled_rho_{key}")
        lines.append(f"- pooled ρ ({key}, {s.get(f'pooled_rho_{key}_targets')} complete targets): "
                     f"{'n/a' if rho is None else f'{rho:.3f}'}")
    if "loto_vs_200_top_ranked" in s:
        w = s["loto_vs_200_top_ranked"]
        lines.append(f"- top-ranked sources, test VI at 200 minus at S*(t): mean {w['mean_vi_gain']:+.4f} over "
                     f"{w['pairs']} tile × seed pairs, Wilcoxon p {w['p_value']:.3g}")
        lines.append(f"- rule (§5.8): {json.dumps(s['rule'])}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], s: dict, path: Path) -> None:
    """Validation and test VI against fine-tuning steps, one panel per target (mean over seeds per source)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted(s["targets"])
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    for ax, t in zip(axes[0], targets):
        e = s["targets"][t]
        for src, v in sorted(e["sources"].items(), key=lambda kv: kv[1]["rank"]):
            rs = [r for r in rows if r["target"] == t and r["init"] == src]
            steps = [c["steps"] for c in rs[0]["curve"]]
            val = [np.mean([_at(r, st)["val_vi"] for r in rs]) for st in steps]
            test = [np.mean([_at(r, st)["test_vi"] for r in rs]) for st in steps]
            colour = f"C{v['rank'] - 1}"  # colour = MMD² rank, the same in every panel
            ax.plot(steps, test, "o-", color=colour, label=f"{src} (rank {v['rank']}) test")
            ax.plot(steps, val, "--", color=colour, alpha=0.6, label=f"{src} validation")
        if t in SCRATCH_VI:
            ax.axhline(np.mean(SCRATCH_VI[t]), color="k", lw=1, ls=":", label="converged scratch (§5.5)")
        if e["s_star_loto"]:
            ax.axvline(e["s_star_loto"], color="grey", lw=1, label="S*(t), other targets")
        ax.set_title(f"target {t}")
        ax.set_xlabel("fine-tuning steps (n = 4)")
        ax.set_ylabel("VI (mean over seeds)")
        ax.legend(fontsize=5.5, loc="best")  # every panel has its own three sources
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def parse_args(argv, description: str, check_default: Path | None, check_help: str) -> argparse.Namespace:
    """The command line shared with ``finetune_interpolate.py``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--check", type=Path, default=check_default, help=check_help)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--targets", nargs="+", default=list(tr.TARGETS), choices=list(tr.TARGETS))
    ap.add_argument("--part", type=int, nargs=2, default=(0, 1), metavar=("I", "K"),
                    help="run only every K-th planned run starting at I (two processes: 0 2 and 1 2)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def run_planned(args, execute_run, ranking_dir: Path) -> list[dict]:
    """Every planned run of this process (unless ``--report-only``), then every finished row under OUT/runs."""
    if not args.report_only:
        root = resolve_data_root(args.data_root)
        tgts = {t: tr.load_target(t, root) for t in args.targets}
        ranks_of = {t: tr.ranking(tgts[t], ranking_dir, args.device) for t in args.targets}
        runs = plan(args.targets, ranks_of)[args.part[0]::args.part[1]]
        for i, r in enumerate(runs):
            print(f"[{time.strftime('%H:%M:%S')}] {i + 1}/{len(runs)} {r['target']} {r['init']} seed {r['seed']}",
                  file=sys.stderr, flush=True)
            execute_run(r, tgts[r["target"]], ranks_of[r["target"]], args.out, args.device, args.check)
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted((args.out / "runs").glob("*.json"))]


def main(argv=None) -> int:
    args = parse_args(argv, __doc__.splitlines()[0], None,
                      "a transfer_real.py output folder: chunk 1 must reproduce its n = 4 rows")
    rows = run_planned(args, execute, args.check or args.out)
    if not rows:
        print("no runs yet")
        return 0
    s = summarize(rows)
    _atomic.write_json(args.out / "summary.json", s)
    _atomic.write_bytes(args.out / "report.md", render(s).encode())
    plot(rows, s, args.out / "curves.png")
    print(render(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
