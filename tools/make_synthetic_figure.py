#!/usr/bin/env python
"""Regenerate docs/figures/synthetic_vs_real.png: synthetic EM domains (top: four styles of a
domain family; middle: their instance labels) beside real slices from ../shared/em_data
(bottom), all 256x256 crops at native pixel size.

Usage: python tools/make_synthetic_figure.py [--em-data ../shared/em_data] [--out docs/figures/synthetic_vs_real.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

REAL = [
    ("ISBI 2012, ssTEM 4 nm", "isbi2012_drosophila_l1_vnc/data/membrane/train/image", 0, (128, 128)),
    ("Gerhard L3 VNC, ssTEM 4.6 nm", "drosophila_l3_vnc_gerhard/stack1/raw", 0, (300, 300)),
    ("gala FIB-SEM, 10 nm", "drosophila_fibsem_gala_example/tests/example-data/train-image.h5:stack", 10, (0, 0)),
    ("EPFL CA1 FIB-SEM, 5 nm", "epfl_hippocampus_mouse_dense/data/epfl_train/slices", 0, (300, 300)),
    ("Kasthuri cortex, 6 nm, CLAHE", "kasthuri_mouse_cortex_uniem/data/DNN_test_images", 0, (300, 300)),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--em-data", default=str(ROOT.parent / "shared" / "em_data"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "figures" / "synthetic_vs_real.png"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuroadda_rt import open_volume
    from neuroadda_rt.study.synthetic import DomainStyle, domain_family, make_domain

    styles, newick = domain_family(4, seed=args.seed)
    styles = [DomainStyle(name="default")] + styles
    synth = [make_domain(s, (3, 256, 256), seed=args.seed + i) for i, s in enumerate(styles)]
    em = Path(args.em_data)
    real = []
    if em.is_dir():
        for title, rel, z, (y, x) in REAL:
            v = open_volume(str(em / rel))
            sl = v[z] if v.ndim == 3 else v[...]
            crop = sl[y:y + 256, x:x + 256]
            real.append((title, crop))
    ncol = max(len(synth), len(real))
    nrow = 3 if real else 2
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.75 * nrow), squeeze=False)
    rng = np.random.default_rng(0)
    for i, (s, (img, lab)) in enumerate(zip(styles, synth)):
        axes[0, i].imshow(img[1], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[0, i].set_title(f"synthetic: {s.name}", fontsize=8)
        lut = rng.random((int(lab.max()) + 1, 3))
        lut[0] = 0
        axes[1, i].imshow(lut[lab[1]], interpolation="nearest")
        axes[1, i].set_title(f"labels ({int(lab[1].max() > 0) and len(np.unique(lab[1])) - 1} ids)", fontsize=8)
    for i, (title, crop) in enumerate(real):
        axes[2, i].imshow(crop, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[2, i].set_title(f"real: {title}", fontsize=8)
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"Synthetic EM domains (top, labels middle) vs real EM (bottom); family tree {newick}", fontsize=7)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("." + out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    print(out)


if __name__ == "__main__":
    main()
