"""The study's figures, drawn from its results table (matplotlib's object API: no global state)."""

from __future__ import annotations

import math
from pathlib import Path

from scipy.stats import rankdata

from ... import _atomic
from ...errors import require
from ...selection import STRATEGIES
from .tables import main_strategy, nearest_n, summarize

#: Figure files written by :func:`make_figures` (under ``figures/``).
FIGURES = ("atlas.png", "vi_vs_n.png", "mmd_rank_vs_vi.png", "strategies_n4.png", "vi_reduction_n4.png")


def _fig(n_panels: int, panel_w: float = 3.4, panel_h: float = 2.9):
    require("matplotlib", "report")
    from matplotlib.figure import Figure

    cols = min(max(n_panels, 1), 4)
    rows = max(1, math.ceil(max(n_panels, 1) / cols))
    fig = Figure(figsize=(panel_w * cols, panel_h * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _empty(fig, axes, text: str):
    axes[0].set_visible(True)
    axes[0].text(0.5, 0.5, text, ha="center", va="center", transform=axes[0].transAxes)
    axes[0].set_axis_off()


def make_figures(table, fig_dir, *, atlas=None) -> list[Path]:
    """Write the study's figures (:data:`FIGURES`) to ``fig_dir``; panels without data say so."""
    fig_dir = Path(fig_dir)
    paths = []
    if atlas is not None:
        paths.append(fig_dir / "atlas.png")
        atlas.plot(paths[-1], title="Domain atlas: (MMD²[s,t] + MMD²[t,s]) / 2")
    paths.append(_atomic.save_figure(_fig_vi_vs_n(table), fig_dir / "vi_vs_n.png", dpi=120))
    paths.append(_atomic.save_figure(_fig_rank_vs_vi(table), fig_dir / "mmd_rank_vs_vi.png", dpi=120))
    paths.append(_atomic.save_figure(_fig_strategies(table), fig_dir / "strategies_n4.png", dpi=120))
    paths.append(_atomic.save_figure(_fig_reduction(table), fig_dir / "vi_reduction_n4.png", dpi=120))
    return paths


def _fig_vi_vs_n(table):
    targets = sorted(set(table["target"])) if len(table) else []
    fig, axes = _fig(len(targets))
    if not targets:
        _empty(fig, axes, "no finished runs")
        return fig
    strat = main_strategy(table)
    for ax, t in zip(axes, targets):
        g = table[(table.target == t) & (table.strategy == strat)]
        curves = [("NeuroADDA (top-ranked source)", g[g.is_best_source], "C0"),
                  ("scratch", g[g.init == "scratch"], "C3"),
                  ("random source (mean over sources)", g[(g.init_kind == "source")], "C7")]
        for label, d, color in curves:
            if not len(d):
                continue
            if label.startswith("random"):
                if d.init.nunique() < 2:  # finetune.sources: best -- the "mean" would be the top source again
                    continue
                d = d.groupby(["n", "seed"], as_index=False).vi_total.mean()  # expectation over a random pick
            s = d.groupby("n").vi_total.agg(["mean", "min", "max"]).sort_index()
            x = s.index.to_numpy(dtype=float)
            ax.plot(x, s["mean"], "-o", color=color, label=label, ms=4)
            ax.fill_between(x, s["min"], s["max"], color=color, alpha=0.2, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(g.n)), [str(v) for v in sorted(set(g.n))])
        ax.set_title(f"target {t}")
        ax.set_xlabel("annotated tiles n")
        ax.set_ylabel("VI (held-out tiles)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"VI versus n ({strat} selection; band: min-max over seeds)")
    return fig


def _fig_rank_vs_vi(table):
    targets = sorted(set(table["target"])) if len(table) else []
    src = table[table.init_kind == "source"] if len(table) else table
    if targets and src.groupby("target").init.nunique().max() < 2:
        fig, axes = _fig(1)
        _empty(fig, axes, "one source per target (finetune.sources: best):\n"
                          "MMD² rank versus fine-tuned VI needs finetune.sources: all")
        return fig
    fig, axes = _fig(len(targets) + 1)
    if not targets:
        _empty(fig, axes, "no finished runs")
        return fig
    summ = summarize(table)
    n4, strat = summ["n_for_comparisons"], summ["strategy_for_comparisons"]
    sub = table[(table.n == n4) & (table.strategy == strat) & (table.init_kind == "source")]
    pooled_ax = axes[len(targets)]
    for k, (ax, t) in enumerate(zip(axes, targets)):
        g = sub[sub.target == t]
        if not len(g):
            ax.set_title(f"target {t}: no source runs")
            continue
        m = g.groupby("init").agg(vi=("vi_total", "mean"), lo=("vi_total", "min"), hi=("vi_total", "max"),
                                  rank=("source_rank", "first"))
        ax.errorbar(m["rank"], m["vi"], yerr=[m["vi"] - m["lo"], m["hi"] - m["vi"]], fmt="o", capsize=2)
        for name, r in m.iterrows():
            ax.annotate(str(name), (r["rank"], r["vi"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        rho = summ["spearman"]["per_target"].get(t, {}).get("spearman_rho", float("nan"))
        ax.set_xticks(sorted(set(int(v) for v in m["rank"])))
        ax.set_title(f"target {t}: Spearman ρ = {rho:.2f}")
        ax.set_xlabel("MMD² rank of the source (1 = closest)")
        ax.set_ylabel(f"fine-tuned VI (n = {n4})")
        pooled_ax.scatter(m["rank"], rankdata(m["vi"].to_numpy()), color=f"C{k % 10}", label=str(t))
    if len(sub):
        pooled_ax.set_xticks(sorted(set(int(v) for v in sub.source_rank.dropna())))
    pooled_ax.set_title(f"pooled: Spearman ρ = {summ['spearman']['pooled']:.2f}")
    pooled_ax.set_xlabel("MMD² rank of the source")
    pooled_ax.set_ylabel("VI rank within target")
    pooled_ax.legend(fontsize=6)
    fig.suptitle(f"Does MMD² predict transfer? ({strat} selection, n = {n4})")
    return fig


def _fig_strategies(table):
    targets = sorted(set(table["target"])) if len(table) else []
    fig, axes = _fig(1, panel_w=max(4.0, 1.2 * len(targets) + 2), panel_h=3.2)
    ax = axes[0]
    if not targets:
        _empty(fig, axes, "no finished runs")
        return fig
    n4 = nearest_n(table)
    sub = table[(table.n == n4) & table.is_best_source]
    strategies = [s for s in STRATEGIES if s in set(sub.strategy)] + sorted(set(sub.strategy) - set(STRATEGIES))
    width = 0.8 / max(1, len(strategies))
    for k, s in enumerate(strategies):
        xs, ys, lo, hi = [], [], [], []
        for i, t in enumerate(targets):
            v = sub[(sub.target == t) & (sub.strategy == s)].vi_total
            if len(v):
                xs.append(i + (k - (len(strategies) - 1) / 2) * width)
                ys.append(v.mean())
                lo.append(v.mean() - v.min())
                hi.append(v.max() - v.mean())
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=s, color=f"C{k}")
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
    ax.set_ylabel("VI (held-out tiles)")
    ax.legend(fontsize=7, title="selection")
    ax.set_title(f"Selection strategies, top-ranked source, n = {n4}\n(bars: mean, whiskers: min-max over seeds)")
    return fig


def _fig_reduction(table):
    fig, axes = _fig(1, panel_w=5.0, panel_h=3.2)
    ax = axes[0]
    if not len(table):
        _empty(fig, axes, "no finished runs")
        return fig
    summ = summarize(table)
    red = summ.get("vi_reduction_vs_scratch", {})
    if not red:
        _empty(fig, axes, "no NeuroADDA/scratch pairs")
        return fig
    targets = sorted(red)
    means = [red[t]["mean_percent"] for t in targets]
    sds = [red[t]["sd_percent"] for t in targets]
    ax.bar(range(len(targets)), means, yerr=sds, capsize=3, color=["C2" if m > 0 else "C3" for m in means])
    ax.axhspan(25, 67, color="0.85", zorder=0, label="paper: 25-67%")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
    ax.set_ylabel("VI reduction vs scratch (%)")
    ax.legend(fontsize=7)
    ax.set_title(f"NeuroADDA vs scratch at n = {summ['n_for_comparisons']} "
                 f"(mean {summ.get('vi_reduction_mean_percent', float('nan')):.0f}%)")
    return fig
