"""Post hoc diagnostic for issue 17 (``docs/results.md`` §3.10): does the learned fold / stain network rank the
injected artefacts above clean tiles, and how much recall does the reference-calibrated cut leave?

Per acquisition of ``benchmarks/qc_real_acceptance.py`` (the 3.1 injections, 100 clean stream tiles per
acquisition): the AUC of the network's score between the clean stream tiles and the injected ones, the recall at
the clean stream's own 98th percentile (an oracle per-acquisition cut spending the whole 2 % budget on this one
detector, using tiles the monitor never sees in advance), and the recall above the reference's largest score.

    NEUROADDA_DATA=../shared/em_data python benchmarks/qc_net_ranking.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qc_real_acceptance as acc  # noqa: E402


def auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """The probability that a positive scores above a negative (ties count half): Mann-Whitney U / (n m)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(pos, neg).statistic / (len(neg) * len(pos)))


def main(argv=None) -> int:
    from neuroadda_rt.qc.artefact_net import NET_DETECTORS, artefact_net_scores

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("NEUROADDA_DATA", "../shared/em_data")))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    data = acc.prepare(args.data)
    out = {}
    for name, a in data.items():
        clean = artefact_net_scores(a["tiles"][~a["ref"] & a["clean"]].astype(np.float32) / 255)
        ref = artefact_net_scores(a["tiles"][a["ref"]].astype(np.float32) / 255)
        inj, _ = acc.injected_set(a)
        for j, det in enumerate(NET_DETECTORS):
            kind = det.split("_")[0]
            pos = artefact_net_scores(inj[kind].astype(np.float32) / 255)[:, j]
            out.setdefault(name, {})[kind] = {
                "auc_vs_clean_stream": auc(clean[:, j], pos),
                "recall_at_clean_stream_98th_percentile": float((pos > np.quantile(clean[:, j], 0.98)).mean()),
                "recall_above_reference_max": float((pos > ref[:, j].max()).mean())}
    print("| acquisition | fold: AUC / recall at the clean stream's 2 % / above the reference max | stain: the same |")
    print("|---|---|---|")
    for name, row in out.items():
        cells = [" / ".join(f"{v:.2f}" for v in row[k].values()) for k in ("fold", "stain")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    means = []
    for k in ("fold", "stain"):
        vals = [float(np.mean([row[k][m] for row in out.values()])) for m in out[next(iter(out))][k]]
        means.append(" / ".join(f"{v:.2f}" for v in vals))
    print(f"| mean over acquisitions | {means[0]} | {means[1]} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
