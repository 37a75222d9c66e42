#!/usr/bin/env python
"""Regenerate ``tests/assets/tiny_model/``: a tiny, deterministic model package (2-D boundary UNet,
widths 4-8-16) so that tests and other engineers can load a model without training; and
``tests/assets/tiny_affinities_3d/`` (3-D affinity UNet, widths 4-8, random weights): exporting a 3-D network
to ONNX takes 40-80 s on the 2-core VM, too long to redo in every test run that needs a 3-D package.

The weights are a fixed random initialisation (not trained: the package exercises formats and
runtimes, not segmentation quality) with BatchNorm statistics estimated on the reference tiles. Reference features are the
mean-pooled encoder features of 32 tiles of 64 x 64 drawn from a synthetic EM domain.

Usage::

    python tools/make_test_assets.py            # rewrite tests/assets/tiny_model
    python tools/make_test_assets.py --check    # exit 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "assets" / "tiny_model"


def build(dest: Path) -> None:
    import torch

    import neuroadda_rt
    from neuroadda_rt.models import UNet, batchnorm_statistics_from

    torch.manual_seed(20260101)
    net = UNet(dim=2, widths=(4, 8, 16), head="boundary")
    try:
        from neuroadda_rt.study.synthetic import make_domain

        image = make_domain(None, (256, 256), seed=3)[0]
        source = "neuroadda_rt.study.synthetic.make_domain(None, (256, 256), seed=3)"
    except ImportError:  # pragma: no cover - the data layer is part of the package
        image = (np.random.default_rng(3).random((256, 256)) * 255).astype(np.uint8)
        source = "uniform noise, seed 3"
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 256 - 64, 32), rng.integers(0, 256 - 64, 32)
    tiles = np.stack([image[y:y + 64, x:x + 64] for y, x in zip(ys, xs)])
    # BatchNorm statistics estimated on the tiles (one cumulative pass in train mode): with
    # arbitrary statistics the pooled features are nearly constant across tiles, useless for
    # ranking tests; with data statistics they spread like a trained encoder's
    batchnorm_statistics_from(net, tiles[:, None].astype(np.float32) / 255)
    neuroadda_rt.save_model(
        net, dest, name="tiny", organism="synthetic", tissue="neuropil", modality="synthetic-ssTEM",
        voxel_size_nm=(40.0, 4.0, 4.0), normalization={"rule": "dtype"},
        training={"data": f"untrained test asset (random weights, BatchNorm statistics of the reference "
                          f"tiles); reference tiles from {source}", "n_samples": 0},
        metrics={}, reference_tiles=tiles, pooling="mean",
        reference_info={"tile_size": 64, "seed": 0, "source": source},
        extra={"generator": "tools/make_test_assets.py"}, overwrite=True)


OUT_3D = ROOT / "tests" / "assets" / "tiny_affinities_3d"


def build_affinities_3d(dest: Path) -> None:
    import torch

    import neuroadda_rt
    from neuroadda_rt.models import UNet

    torch.manual_seed(20261202)
    net = UNet(dim=3, widths=(4, 8), head="affinities").eval()
    ref = np.random.default_rng(1).random((4, 8)).astype(np.float32)
    neuroadda_rt.save_model(
        net, dest, name="tiny-affinities-3d", organism="synthetic", tissue="neuropil", modality="synthetic-FIB-SEM",
        voxel_size_nm=(40.0, 4.0, 4.0), normalization={"rule": "dtype"},
        training={"data": "untrained test asset (random weights and BatchNorm statistics)", "n_samples": 0},
        metrics={}, reference_features=ref, pooling="mean", reference_info={"source": "uniform random features"},
        extra={"generator": "tools/make_test_assets.py"}, overwrite=True)


ASSETS = {OUT: build, OUT_3D: build_affinities_3d}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed asset instead of writing")
    args = ap.parse_args(argv)
    if not args.check:
        for out, make in ASSETS.items():
            make(out)
            size = sum(f.stat().st_size for f in out.iterdir())
            print(f"wrote {out} ({size / 1024:.0f} KiB)")
        return 0
    status = 0
    for out, make in ASSETS.items():
        with tempfile.TemporaryDirectory() as tmp:
            make(Path(tmp) / out.name)
            new = json.loads((Path(tmp) / out.name / "model.json").read_text())["files"]
            old = json.loads((out / "model.json").read_text())["files"]
            same = new == old and filecmp.cmp(Path(tmp) / out.name / "model.json", out / "model.json", shallow=False)
            diff = sorted(k for k in new if new[k] != old.get(k))
            print(f"{out.name}: " + ("asset up to date" if same else f"asset differs: {diff or ['model.json']}"))
            status |= 0 if same else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
