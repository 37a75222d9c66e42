"""Weight interpolation between a source and its fine-tuned copy (WiSE-FT) on the real targets (issue 16;
protocol: ``docs/results.md`` §5.9, fixed before any run).

For every target, source and seed of the real-data transfer benchmark at n = 4: the product's 200-step
``finetune`` (checked against the committed rerun rows), then every floating-point tensor set to
``(1 - MIX) * source + MIX * fine-tuned`` with MIX = 0.5, the threshold re-tuned on the annotated tiles, and the
32 fixed test tiles scored. One JSON per run under ``OUT/runs``; ``report.md`` / ``summary.json`` at the end.

    python benchmarks/finetune_interpolate.py --out bench_out/finetune_interpolate \\
        --check docs/results/transfer_real_n4
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import neuroadda_rt as nr
import numpy as np
from neuroadda_rt import _atomic
from neuroadda_rt.training import interpolate_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_length as fl  # noqa: E402  (same runs, tiles, check and scratch numbers)
import transfer_real as tr  # noqa: E402

FORMAT = "neuroadda_rt.finetune_interpolate/1"
MIX = 0.5  # fixed in §5.9: no n = 4 signal to tune it on
ALPHA = 0.05


def execute(run: dict, tgt: dict, ranks: list[dict], out: Path, device: str, check: Path) -> dict:
    rid, path = fl.run_file(run, out)
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    src = tr.sources_for(tgt["name"])[run["init"]]
    tiles, labels, coords, vimg, vlab = fl.annotated_tiles(tgt, src, run["seed"], device)
    work = out / "work" / rid
    # plain fine-tuning (mix=1: §5.4's run), interpolated here so that both are scored from one training run
    ft = nr.finetune(src, tiles, labels, steps=fl.PRODUCT_STEPS, lr=fl.LR, batch_size=fl.BATCH,
                     patch_size=tgt["tile"], seed=run["seed"], device=device, out=work / "ft", overwrite=True,
                     mix=1.0)
    product = fl._scores(ft, tgt, vimg, vlab, device)
    fl._check_product_run(check, run, product)
    net = ft.unet().eval()
    net.load_state_dict(interpolate_weights(src.unet().state_dict(), net.state_dict(), MIX))
    th = fl.threshold_on_annotated(net, tiles, labels, ft)
    mixed_pkg = nr.save_model(net, work / "mixed", name=f"{src.name}-wise{MIX:g}", normalization=ft.normalization,
                              reference_features=ft.reference_features, pooling=ft.pooling, overwrite=True)
    mixed = fl._scores(mixed_pkg, tgt, vimg, vlab, device, threshold=th)
    shutil.rmtree(work, ignore_errors=True)
    return fl.save_run(path, rid, run, tgt, ranks, coords, t0, mix=MIX, finetuned=product, interpolated=mixed)


def summarize(rows: list[dict], as_is: dict | None = None) -> dict:
    """Per target and source: test VI fine-tuned / interpolated; the rule of §5.9 on the top-ranked runs."""
    from scipy.stats import rankdata, wilcoxon

    from neuroadda_rt.study.experiments.tables import _spearman

    out: dict = {"format": FORMAT, "mix": MIX, "n_runs": len(rows), "targets": {}}
    diffs, worse_than_sd = [], {}
    pooled = {"finetuned": ([], []), "interpolated": ([], [])}
    for t in sorted({r["target"] for r in rows}):
        rt = [r for r in rows if r["target"] == t]
        top = rt[0]["top_ranked"]
        e: dict = {"top_ranked": top, "sources": {}}
        for s in sorted({r["init"] for r in rt}):
            rs = sorted([r for r in rt if r["init"] == s], key=lambda r: r["seed"])
            v = {"rank": rs[0]["source_rank"], "seeds": [r["seed"] for r in rs],
                 "test_vi_finetuned": [r["finetuned"]["test_vi"] for r in rs],
                 "test_vi_interpolated": [r["interpolated"]["test_vi"] for r in rs],
                 "val_vi_finetuned": [r["finetuned"]["val_vi"] for r in rs],
                 "val_vi_interpolated": [r["interpolated"]["val_vi"] for r in rs]}
            if as_is and t in as_is and s in as_is[t]:
                v["test_vi_as_is"] = as_is[t][s]
            if s == top:
                red = {}
                for key in ("test_vi_finetuned", "test_vi_interpolated"):
                    pct = [100 * (fl.SCRATCH_VI[t][r["seed"]] - x) / fl.SCRATCH_VI[t][r["seed"]]
                           for r, x in zip(rs, v[key])]
                    red[key] = {"mean_percent": float(np.mean(pct)),
                                "sd_percent": float(np.std(pct, ddof=1)) if len(pct) > 1 else float("nan")}
                v["vi_reduction_vs_scratch"] = red
                d = [np.asarray(r["finetuned"]["tile_vi"]) - np.asarray(r["interpolated"]["tile_vi"]) for r in rs]
                diffs += d
                sd = float(np.std(v["test_vi_finetuned"], ddof=1)) if len(rs) > 1 else float("nan")
                gap = float(np.mean(v["test_vi_interpolated"]) - np.mean(v["test_vi_finetuned"]))
                e["top_gap_vi"], e["top_seed_sd"] = gap, sd
                worse_than_sd[t] = bool(gap > sd)
            e["sources"][s] = v
        srcs = e["sources"]
        if len(srcs) == 3 and all(len(v["seeds"]) == len(fl.SEEDS) for v in srcs.values()):
            for key in pooled:
                pooled[key][0].extend(float(v["rank"]) for v in srcs.values())
                pooled[key][1].extend(rankdata([np.mean(v[f"test_vi_{key}"]) for v in srcs.values()]))
        out["targets"][t] = e
    for key, (x, y) in pooled.items():
        out[f"pooled_rho_{key}"] = _spearman(x, y) if len(x) >= 6 else None
    if diffs:
        d = np.concatenate(diffs)
        res = wilcoxon(d) if np.any(d) else None
        p = float(res.pvalue) if res else 1.0
        complete = len(diffs) == 4 * len(fl.SEEDS)
        adopt = complete and p < ALPHA and d.mean() > 0 and not any(worse_than_sd.values())
        out["top_ranked_finetuned_minus_interpolated"] = {"pairs": int(d.size), "mean_vi": float(d.mean()),
                                                          "p_value": p}
        out["rule"] = {"complete": complete, "worse_than_seed_sd": worse_than_sd, "adopt": bool(adopt)}
    return out


def render(s: dict) -> str:
    lines = [f"# Weight interpolation, mix {s['mix']} (§5.9)", "", f"Runs: {s['n_runs']}.", "",
             "| target | source (rank) | seeds | test VI as-is / fine-tuned 200 / interpolated | "
             "val VI fine-tuned / interpolated | VI red. vs scratch fine-tuned / interpolated |",
             "|---|---|---:|---|---|---|"]
    for t, e in s["targets"].items():
        for src, v in sorted(e["sources"].items(), key=lambda kv: kv[1]["rank"]):
            red = v.get("vi_reduction_vs_scratch")
            red_s = " / ".join(f"{red[k]['mean_percent']:.0f} ± {red[k]['sd_percent']:.0f} %"
                               for k in ("test_vi_finetuned", "test_vi_interpolated")) if red else ""
            as_is = v.get("test_vi_as_is")
            lines.append(f"| {t} | {src} ({v['rank']}) | {len(v['seeds'])} | "
                         f"{'n/a' if as_is is None else f'{as_is:.3f}'} / {np.mean(v['test_vi_finetuned']):.3f} / "
                         f"{np.mean(v['test_vi_interpolated']):.3f} | {np.mean(v['val_vi_finetuned']):.3f} / "
                         f"{np.mean(v['val_vi_interpolated']):.3f} | {red_s} |")
    lines.append("")
    for key in ("finetuned", "interpolated"):
        rho = s.get(f"pooled_rho_{key}")
        lines.append(f"- pooled ρ ({key}): {'n/a' if rho is None else f'{rho:.3f}'}")
    if "rule" in s:
        w = s["top_ranked_finetuned_minus_interpolated"]
        lines.append(f"- top-ranked sources, test VI fine-tuned minus interpolated: mean {w['mean_vi']:+.4f} over "
                     f"{w['pairs']} tile × seed pairs, Wilcoxon p {w['p_value']:.3g}")
        lines.append(f"- rule (§5.9): {json.dumps(s['rule'])}")
    return "\n".join(lines) + "\n"


def _as_is(check: Path) -> dict:
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in (check / "runs").glob("*__n0__*.json")]
    out: dict = {}
    for r in rows:
        out.setdefault(r["target"], {})[r["init"]] = float(r["vi_total"])
    return out


def main(argv=None) -> int:
    args = fl.parse_args(argv, __doc__.splitlines()[0],
                         Path(__file__).resolve().parents[1] / "docs" / "results" / "transfer_real_n4",
                         "transfer_real.py rows the 200-step run must reproduce")
    rows = fl.run_planned(args, execute, args.check)
    if not rows:
        print("no runs yet")
        return 0
    s = summarize(rows, _as_is(args.check))
    _atomic.write_json(args.out / "summary.json", s)
    _atomic.write_bytes(args.out / "report.md", render(s).encode())
    print(render(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
