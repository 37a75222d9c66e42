"""The encoder level of the ranking features, against fine-tuned VI (issue 16 item 2; protocol: ``docs/results.md``
§5.6, fixed before any run).

Every bundled real-EM package is copied at encoder levels 0-3 without retraining: its weights in
``UNet(feature_level=k)``, saved by :func:`~neuroadda_rt.save_model` with reference features of the same 256
training tiles the zoo build drew (the level of the shipped package must reproduce its reference features, which
checks the draw). Each variant (level × pooled columns ``mean`` / ``all``) ranks the other three sources of every
labelled real target of §5.1 on its annotation pool (ranking seeds 0, 1, 2), and the orders are scored against the
fine-tuned VI of ``benchmarks/transfer_real.py`` (n = 4: the decision; n = 1, 8 and the as-is VI: reported only),
with a bootstrap over test tiles and fine-tune seeds.

    NEUROADDA_DATA=../shared/em_data python benchmarks/ranking_levels.py --out /tmp/ranking_levels \\
        --transfer /path/to/transfer_real/out

Writes ``OUT/packages/L<k>/<name>`` (the level copies), ``OUT/rankings.json``, ``OUT/summary.json`` and
``OUT/report.md``, and prints the report. ``--report-only`` re-scores stored rankings (e.g. after more transfer runs).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from neuroadda_rt import _atomic, load_model, rank_sources, save_model
from neuroadda_rt.datasets import resolve_data_root
from neuroadda_rt.errors import InputValueError
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranking_proxy import pooled_rho, rho_regret
from transfer_real import FT_STEPS, N_TEST, POOL, TARGETS, load_target, run_id, sources_for

REPO = Path(__file__).resolve().parents[1]
LEVELS = (0, 1, 2, 3)
POOLINGS = ("mean", "all")
DEFAULT = "L2/mean"
SEEDS = (0, 1, 2)
N_BOOT = 2000
DECISION_N = 4


def variant(level: int, pooling: str) -> str:
    return f"L{level}/{pooling}"


VARIANTS = [variant(k, p) for k in LEVELS for p in POOLINGS]


def reference_tiles_of(pkg, data_root) -> np.ndarray:
    """The training tiles the zoo build drew for ``pkg``'s reference features (its recipe, seed and tile size),
    read again from the data set its card names."""
    from neuroadda_rt.zoo_builder import DatasetZooRecipe, _load_data, _reference_tiles

    recipe_dict = pkg.training.get("zoo_recipe")
    if recipe_dict is None:
        raise InputValueError(f"{pkg.name}: expected a zoo package built by zoo_builder (its card's zoo_recipe), "
                              f"got none")
    data = _load_data(REPO / "examples" / "datasets" / f"{pkg.name}.json", data_root)
    tiles, tile = _reference_tiles(data, DatasetZooRecipe.from_dict(recipe_dict))
    info = pkg.metadata["reference_features"]
    if tile != info.get("tile_size") or len(tiles) != info.get("n_tiles"):
        raise InputValueError(f"{pkg.name}: the redrawn reference tiles ({len(tiles)} of {tile} px) are not the "
                              f"package's ({info.get('n_tiles')} of {info.get('tile_size')} px)")
    return tiles


def level_package(pkg, level: int, dest: Path, tiles: Callable[[], np.ndarray]):
    """``pkg``'s weights with ranking features taken at encoder ``level``, reference features embedded from
    ``tiles()`` (called only when the copy is made). Reused when ``dest`` holds the copy of this very package."""
    import torch
    from neuroadda_rt.models import UNet

    if (dest / "model.json").is_file():
        done = load_model(dest)
        if done.metadata.get("reference_features", {}).get("copied_from") == pkg.sha256:
            return done
    net = UNet(**{**pkg.config, "feature_level": level})
    with torch.no_grad():
        net.load_state_dict(pkg.unet().state_dict())
    net.eval()
    info = pkg.metadata["reference_features"]
    return save_model(net, dest, name=pkg.name, organism=pkg.organism, tissue=pkg.tissue, modality=pkg.modality,
                      voxel_size_nm=pkg.voxel_size_nm, normalization=pkg.normalization, training=pkg.training,
                      metrics=pkg.metrics, reference_tiles=tiles(), pooling=pkg.pooling,
                      reference_info={k: v for k, v in info.items() if k not in ("file", "pooling", "n_tiles",
                                                                                  "n_features")}
                      | {"copied_from": pkg.sha256, "feature_level": level},
                      extra=pkg.metadata.get("extra"), overwrite=True)


def level_zoo(out: Path, data_root) -> dict[int, dict[str, object]]:
    """``{level: {name: package}}`` for every bundled real-EM package; the shipped level is checked. Each
    package's data set is read at most once, and not at all when every copy exists."""
    zoo: dict[int, dict[str, object]] = {}
    for name, pkg in sources_for("").items():
        tiles = functools.cache(functools.partial(reference_tiles_of, pkg, data_root))
        for k in LEVELS:
            print(f"[{time.strftime('%H:%M:%S')}] {name} at level {k}", file=sys.stderr, flush=True)
            zoo.setdefault(k, {})[name] = copy = level_package(pkg, k, out / "packages" / f"L{k}" / name, tiles)
            if k == pkg.feature_level:
                err = float(np.max(np.abs(copy.reference_features - pkg.reference_features)))
                scale = float(np.max(np.abs(pkg.reference_features)))
                if err > 1e-4 * max(scale, 1.0):
                    raise RuntimeError(f"{name}: the level-{k} copy does not reproduce the shipped reference "
                                       f"features (max |difference| {err:.3g}): the tile draw differs")
    return zoo


def rankings(zoo, targets: dict, out: Path, seeds) -> dict:
    """``{variant: {target: {seed: [source names in rank order]}}}``, with the MMD² of each."""
    result: dict = {}
    for t, tgt in targets.items():
        for k in LEVELS:
            srcs = [p for name, p in zoo[k].items() if name != t]
            for seed in seeds:
                for pooling in POOLINGS:
                    v = variant(k, pooling)
                    print(f"[{time.strftime('%H:%M:%S')}] rank {t} seed {seed} {v}", file=sys.stderr, flush=True)
                    r = rank_sources(tgt["pool_img"], srcs, seed=seed, cache_dir=out / "cache", device="cpu",
                                     target_voxel_size_nm=tgt["voxel_size_nm"], pooling=pooling)
                    result.setdefault(v, {}).setdefault(t, {})[str(seed)] = {
                        "order": r.names, "mmd2": {e.name: float(e.mmd2) for e in r}}
    return result


def transfer_tile_vi(folder: Path) -> dict:
    """``{n: {target: {source: (seeds, tiles) VI array}}}`` of the fine-tuned rows of a ``transfer_real.py``
    folder under its default settings (as-is rows under n = 0); a target is kept at an n only when all its
    sources have the same seeds."""
    defaults = argparse.Namespace(steps=FT_STEPS, n_test=N_TEST, pool=POOL)
    by: dict = {}
    for p in sorted((folder / "runs").glob("*.json")):
        r = json.loads(p.read_text(encoding="utf-8"))
        if r.get("init_kind") not in ("source", "as_is") or r["run_id"] != run_id(r, defaults):
            continue
        by.setdefault(int(r["n"]), {}).setdefault(r["target"], {}).setdefault(r["init"], {})[int(r["seed"])] = \
            np.asarray(r["tile_vi"], dtype=np.float64)
    out: dict = {}
    for n, targets in by.items():
        for t, srcs in targets.items():
            seeds = {tuple(sorted(v)) for v in srcs.values()}
            if len(srcs) >= 2 and len(seeds) == 1:
                order = next(iter(seeds))
                out.setdefault(n, {})[t] = {s: np.stack([v[k] for k in order]) for s, v in srcs.items()}
    return out


def _scores(orders: dict, vi: dict, seeds) -> tuple[float, float]:
    """Mean over ranking seeds of the pooled ρ and of the mean top-1 regret."""
    rhos, regrets = [], []
    for s in seeds:
        o = {t: orders[t][str(s)]["order"] for t in vi}
        rhos.append(pooled_rho(o, vi))
        regrets.append(np.mean([rho_regret(o[t], vi[t])[1] for t in vi]))
    return float(np.mean(rhos)), float(np.mean(regrets))


def _bootstrap_rho(rank: dict, per_target: dict, seeds, n_boot: int = N_BOOT) -> dict[str, np.ndarray]:
    """``{variant: (n_boot,) pooled ρ, mean over ranking seeds}`` with, per target, the test tiles and the fine-tune
    seeds resampled with replacement (paired across sources and variants; rankings held fixed). The same pooled
    Spearman ρ as :func:`pooled_rho` (Pearson's r of the average ranks), vectorised over variants and seeds."""
    targets = sorted(per_target)
    names = {t: sorted(per_target[t]) for t in targets}
    xs = np.array([[rank[v][t][str(s)]["order"].index(src) + 1 for t in targets for src in names[t]]
                   for v in rank for s in seeds], dtype=np.float64)
    xc = np.apply_along_axis(rankdata, 1, xs)
    xc -= xc.mean(axis=1, keepdims=True)
    x_norm = np.linalg.norm(xc, axis=1)
    rng = np.random.default_rng(0)
    out = np.empty((n_boot, len(rank)))
    for b in range(n_boot):
        ys = []
        for t in targets:
            n_seeds, n_tiles = per_target[t][names[t][0]].shape
            si, ti = rng.integers(0, n_seeds, n_seeds), rng.integers(0, n_tiles, n_tiles)
            ys.append(rankdata([per_target[t][src][np.ix_(si, ti)].mean() for src in names[t]]))
        yc = rankdata(np.concatenate(ys))
        yc -= yc.mean()
        y_norm = np.linalg.norm(yc)
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = (xc @ yc) / (x_norm * y_norm)
        out[b] = rho.reshape(len(rank), len(seeds)).mean(axis=1)
    return {v: out[:, i] for i, v in enumerate(rank)}


def summarize(rank: dict, tile_vi: dict, seeds) -> dict:
    summary: dict = {"decision_n": DECISION_N, "default": DEFAULT, "by_n": {}}
    for n, per_target in sorted(tile_vi.items()):
        targets = sorted(per_target)
        vi = {t: {s: float(a.mean()) for s, a in per_target[t].items()} for t in targets}
        block = {"targets": targets, "vi": vi, "variants": {}}
        for v in VARIANTS:
            rho, regret = _scores({t: rank[v][t] for t in targets}, vi, seeds)
            per = {t: {"rho": float(np.mean([rho_regret(rank[v][t][str(s)]["order"], vi[t])[0] for s in seeds])),
                       "top_ranked": [rank[v][t][str(s)]["order"][0] for s in seeds]} for t in targets}
            block["variants"][v] = {"pooled_rho": rho, "mean_regret": regret, "per_target": per}
        if n == DECISION_N and len(targets) > 1:
            # rankings held fixed; test tiles and fine-tune seeds resampled (§5.6)
            boot = _bootstrap_rho({v: {t: rank[v][t] for t in targets} for v in VARIANTS}, per_target, seeds)
            base = boot[DEFAULT]
            for v in VARIANTS:
                b, d = boot[v], boot[v] - base
                block["variants"][v]["bootstrap"] = {
                    "pooled_rho_p5_p95": [float(np.nanpercentile(b, 5)), float(np.nanpercentile(b, 95))],
                    "delta_vs_default_p5_p95": [float(np.nanpercentile(d, 5)), float(np.nanpercentile(d, 95))]}
            qualifies = [v for v in VARIANTS if v != DEFAULT
                         and block["variants"][v]["bootstrap"]["delta_vs_default_p5_p95"][0] > 0]
            # §5.6: highest pooled ρ, then lower mean regret, then the deeper level
            new = min(qualifies, key=lambda v: (-round(block["variants"][v]["pooled_rho"], 9),
                                                round(block["variants"][v]["mean_regret"], 9), -int(v[1]))) \
                if qualifies else None
            summary.update(qualifies=qualifies, new_default=new)
        summary["by_n"][int(n)] = block
    return summary


def render(summary: dict, meta: dict) -> str:
    lines = [f"# Encoder level of the ranking features vs fine-tuned VI (§5.6); ranked {meta.get('ranked_at')}", ""]
    for n, block in summary["by_n"].items():
        what = "as-is VI (n = 0)" if int(n) == 0 else f"fine-tuned VI, n = {n}"
        lines += [f"## {what}{' (the decision)' if int(n) == DECISION_N else ' (reported only)'}", "",
                  "VI (mean over seeds and test tiles): " + "; ".join(
                      f"{t}: " + ", ".join(f"{s} {x:.3f}" for s, x in sorted(d.items(), key=lambda e: e[1]))
                      for t, d in block["vi"].items()), ""]
        boot = int(n) == DECISION_N and "bootstrap" in block["variants"][DEFAULT]
        lines += ["| variant | pooled ρ | mean regret | " + " | ".join(f"{t} ρ (top-ranked per seed)"
                                                                       for t in block["targets"])
                  + (" | ρ 5-95% | Δρ vs default 5-95% |" if boot else " |"),
                  "|---|---:|---:|" + "---|" * len(block["targets"]) + ("---|---|" if boot else "")]
        for v, s in block["variants"].items():
            row = (f"| {v}{' (default)' if v == DEFAULT else ''} | {s['pooled_rho']:+.2f} | {s['mean_regret']:.3f} | "
                   + " | ".join(f"{p['rho']:+.2f} ({', '.join(p['top_ranked'])})" for _, p in sorted(
                       s["per_target"].items())))
            if boot:
                b = s["bootstrap"]
                row += (f" | {b['pooled_rho_p5_p95'][0]:+.2f} to {b['pooled_rho_p5_p95'][1]:+.2f} | "
                        f"{b['delta_vs_default_p5_p95'][0]:+.2f} to {b['delta_vs_default_p5_p95'][1]:+.2f}")
            lines.append(row + " |")
        lines.append("")
    if "qualifies" in summary:
        lines.append(f"Qualify (§5.6 rule): {summary['qualifies'] or 'none'}; new default: "
                     f"{summary['new_default'] or 'none (level 2 mean stays)'}")
    else:
        lines.append(f"No decision: the fine-tuned rows at n = {DECISION_N} are missing or cover one target.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--transfer", required=True, type=Path, help="a transfer_real.py output folder (its runs/)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--report-only", action="store_true", help="re-score OUT/rankings.json; no ranking")
    args = ap.parse_args(argv)
    if not (args.transfer / "runs").is_dir():
        raise SystemExit(f"{args.transfer}: expected a transfer_real.py output folder with runs/, got none")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        rank = json.loads((args.out / "rankings.json").read_text(encoding="utf-8"))
    else:
        root = resolve_data_root(args.data_root)
        zoo = level_zoo(args.out, root)
        targets = {t: load_target(t, root) for t in args.targets}
        rank = rankings(zoo, targets, args.out, args.seeds)
        _atomic.write_json(args.out / "rankings.json", rank)
        _atomic.write_json(args.out / "meta.json", {"ranked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    meta = json.loads((args.out / "meta.json").read_text(encoding="utf-8")) if (args.out / "meta.json").exists() else {}
    tile_vi = {n: {t: v for t, v in d.items() if t in args.targets} for n, d in transfer_tile_vi(args.transfer).items()}
    summary = summarize(rank, {n: d for n, d in tile_vi.items() if d}, args.seeds)
    _atomic.write_json(args.out / "summary.json", summary)
    text = render(summary, meta)
    _atomic.write_bytes(args.out / "report.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
