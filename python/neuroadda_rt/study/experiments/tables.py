"""The study's results table (one row per run) and the statistics summarised from it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from scipy.stats import rankdata, spearmanr

from ... import _atomic
from ...errors import require

log = logging.getLogger("neuroadda_rt")

#: Format of a study's ``summary.json``.
RESULTS_FORMAT = "neuroadda_rt.experiment/1"


def assemble_table(out, run_ids: Iterable[str] | None = None):
    """Read every finished run's row into one DataFrame and write ``results.parquet`` and
    ``results.csv`` atomically. ``run_ids`` restricts the table to one plan's runs."""
    pd = require("pandas", "report")
    out = Path(out)
    runs_dir = out / "runs"
    files = sorted(runs_dir.glob("*.json")) if runs_dir.exists() else []
    if run_ids is not None:
        wanted = set(run_ids)
        files = [f for f in files if f.stem in wanted]
    rows = []
    for f in files:
        try:
            rows.append(json.loads(f.read_text(encoding="utf-8")))
        except ValueError as exc:  # rows are written atomically: an unreadable one is foreign
            log.warning("skipping unreadable row %s (%s)", f, exc)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(["target", "seed", "n", "strategy", "init"]).reset_index(drop=True)
    csv = table.to_csv(index=False).encode()
    _atomic.write_bytes(out / "results.csv", csv)
    with _atomic.atomic_path(out / "results.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    return table


# --------------------------------------------------------------------------------------------
# summary statistics
# --------------------------------------------------------------------------------------------
def _spearman(x, y) -> float:
    """Spearman's ρ over the finite pairs; NaN (not a warning) for fewer than 2 points or constant input."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def nearest_n(table, n: int = 4) -> int | None:
    ns = sorted(set(int(v) for v in table["n"])) if len(table) else []
    if not ns:
        return None
    return min(ns, key=lambda v: (abs(v - n), v))


def main_strategy(table) -> str | None:
    if not len(table):
        return None
    s = set(table["strategy"])
    return "median" if "median" in s else sorted(s)[0]


def summarize(table) -> dict:
    """Spearman ρ (MMD² rank vs fine-tuned VI) per target and pooled, VI reduction at n = 4, and
    how often the top-ranked source is the best fine-tuning start."""
    out: dict[str, Any] = {}
    if not len(table):
        return out
    n4 = nearest_n(table)
    strat = main_strategy(table)
    out["n_for_comparisons"] = n4
    out["strategy_for_comparisons"] = strat
    sub = table[(table.strategy == strat) & (table.n == n4)]
    src = sub[sub.init_kind == "source"]
    per_target = {}
    pooled_x, pooled_y = [], []
    top1 = []
    for t, g in src.groupby("target"):
        mean_vi = g.groupby("init").agg(vi=("vi_total", "mean"), rank=("source_rank", "first"))
        rho = _spearman(mean_vi["rank"], mean_vi["vi"])
        per_target[t] = {"spearman_rho": rho, "n_sources": int(len(mean_vi))}
        # pooled: ranks within each target, so targets with different VI scales can be pooled
        pooled_x += list(mean_vi["rank"].to_numpy(dtype=float))
        pooled_y += list(rankdata(mean_vi["vi"].to_numpy()))
        if len(mean_vi) > 1:  # with one source per target (finetune.sources: best) there is nothing to compare
            top1.append(bool(mean_vi["vi"].idxmin() == mean_vi["rank"].idxmin()))
    out["spearman"] = {"per_target": per_target, "pooled": _spearman(pooled_x, pooled_y)}
    out["top_ranked_is_best_finetune"] = float(np.mean(top1)) if top1 else None
    red = {}
    for t, g in sub.groupby("target"):
        best = g[g.is_best_source]
        scr = g[g.init == "scratch"]
        if len(best) and len(scr):
            m = best.merge(scr, on="seed", suffixes=("", "_scratch"))
            r = 100.0 * (m.vi_total_scratch - m.vi_total) / m.vi_total_scratch
            red[t] = {"mean_percent": float(r.mean()), "sd_percent": float(r.std(ddof=0)), "n_seeds": int(len(r)),
                      "vi_neuroadda": float(m.vi_total.mean()), "vi_scratch": float(m.vi_total_scratch.mean())}
    out["vi_reduction_vs_scratch"] = red
    if red:
        out["vi_reduction_mean_percent"] = float(np.mean([v["mean_percent"] for v in red.values()]))
    return out


def write_mmd_tables(out: Path, names, targets, m, p) -> None:
    """``mmd/mmd2.csv``: one row per (source, target) with its MMD² and p-value."""
    pd = require("pandas", "report")
    rows = [{"source": s, "target": t, "mmd2": m[i, j], "p_value": p[i, j]}
            for i, s in enumerate(names) for j, t in enumerate(targets)]
    _atomic.write_bytes(out / "mmd" / "mmd2.csv", pd.DataFrame(rows).to_csv(index=False).encode())
