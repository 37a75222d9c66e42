"""Train the QC monitor's learned fold / stain detector (``docs/results.md`` §3.9).

A small fully convolutional network scores every location of a tile for a fold and for a stain; a tile's
score per kind is the maximum over locations. It is trained on development EM sets only (EPFL hippocampus,
C. elegans NEUBIAS, FAFB TEMCA2; none of them an acceptance stream of the QC benchmark), with this file's
own artefact simulator -- never ``study.synthetic.apply_artefact``, which makes the benchmark's injections.

    python tools/train_qc_artefact_net.py                 # writes python/neuroadda_rt/data/qc_artefact_net.*
    python tools/train_qc_artefact_net.py --steps 50 --out /tmp/net   # a quick try

Outputs: ``qc_artefact_net.onnx`` (what the monitor runs), ``qc_artefact_net.safetensors`` (the weights) and
``qc_artefact_net.json`` (recipe, data, validation numbers). Deterministic on one machine for a given seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

TILE = 64
CHANNELS = (8, 16, 16, 32, 32, 32)
STRIDES = (1, 2, 2, 1, 2, 1)
KINDS = ("fold", "stain")


# ----------------------------------------------------------------------------------------------- data


def load_images(root: Path, split: str) -> list[np.ndarray]:
    """Development images as float32 [0, 1] 2-D arrays: EPFL hippocampus, C. elegans NEUBIAS, FAFB TEMCA2."""
    from neuroadda_rt.datasets import Dataset
    from neuroadda_rt.io import read_image_2d

    epfl = Dataset.from_json(REPO / "examples" / "datasets" / "epfl_hippocampus.json", data_root=root)
    cel = sorted((root / "celegans_em_neubias" / "slices").glob("*.tif"))
    out = []
    if split == "train":
        out += list(np.asarray(epfl.image("train")[:]))
        out += [read_image_2d(p) for p in cel[:16]]
        out += [read_image_2d(p) for p in sorted((root / "drosophila_fafb_temca2_tiles").rglob("*.jpg"))
                if p.name != "black.jpg"]
    else:
        out += list(np.asarray(epfl.image("test")[:]))
        out += [read_image_2d(p) for p in cel[16:21]]
    return [np.asarray(a, dtype=np.float32) / (255.0 if np.asarray(a).dtype == np.uint8 else 1.0) for a in out]


def random_crop(images, rng) -> np.ndarray:
    """A 64-px crop after a random rescale of 0.5-2x, flips / turns and intensity jitter."""
    img = images[int(rng.integers(len(images)))]
    zoom = float(np.exp(rng.uniform(math.log(0.5), math.log(2.0))))
    src = int(math.ceil(TILE / zoom)) + 2
    h, w = img.shape
    src = min(src, h, w)
    y, x = int(rng.integers(0, h - src + 1)), int(rng.integers(0, w - src + 1))
    patch = img[y:y + src, x:x + src]
    patch = ndimage.zoom(patch, TILE / src, order=1, prefilter=False)[:TILE, :TILE]
    if patch.shape != (TILE, TILE):
        patch = np.pad(patch, ((0, TILE - patch.shape[0]), (0, TILE - patch.shape[1])), mode="edge")
    patch = np.rot90(patch, int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    p = np.clip(patch, 0, 1) ** rng.uniform(0.6, 1.6)
    p = (p - p.mean()) * rng.uniform(0.6, 1.4) + p.mean() + rng.uniform(-0.15, 0.15)
    p = p + rng.normal(0, rng.uniform(0, 0.03), p.shape)
    return np.clip(p, 0, 1).astype(np.float32)


def _smooth(rng, shape, sigma):
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-9)


def sim_fold(t, rng):
    """A dark band along a bent curve: width 2-18 px, Gaussian / flat-top / triangular profile."""
    n = t.shape[0]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) - n / 2
    ang = rng.uniform(0, np.pi)
    c, s = math.cos(ang), math.sin(ang)
    across = yy * c + xx * s - rng.uniform(-0.35, 0.35) * n
    along = -yy * s + xx * c
    across += rng.uniform(-15, 15) * (along / n) ** 2 + rng.uniform(0, 4) * np.sin(along / rng.uniform(8, 40)
                                                                                 + rng.uniform(0, 6.3))
    half = rng.uniform(1, 9)
    d = np.abs(across) / half
    shape = rng.integers(3)
    if shape == 0:
        prof = np.exp(-d ** 2)
    elif shape == 1:
        prof = np.clip(1.5 - d, 0, 1)  # flat top, linear shoulders
    else:
        prof = np.clip(1 - d, 0, 1)
    out = t.astype(np.float64)
    if rng.random() < 0.3:  # compressed, blurred tissue inside the fold
        out = out * (1 - prof) + ndimage.gaussian_filter(out, 1.5) * prof
    out = out * (1 - rng.uniform(0.4, 0.95) * prof) + rng.uniform(0, 0.1) * prof
    if rng.random() < 0.3:  # a bright rim along the crease
        rim = np.exp(-((np.abs(across) - 1.3 * half) / 1.2) ** 2)
        out = out + rng.uniform(0.05, 0.2) * rim
    return np.clip(out, 0, 1).astype(np.float32)


def sim_stain(t, rng):
    """1-3 irregular blobs of a dark (or bright) film: radius 5-35% of the tile + 2 px, opacity 0.6-1."""
    n = t.shape[0]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    cover = np.zeros((n, n))
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(0.05, 0.35) * n + 2
        cy, cx = rng.uniform(0, n), rng.uniform(0, n)
        rr = np.hypot(yy - cy, xx - cx) / r + 0.35 * _smooth(rng, (n, n), max(2.0, r / 4))
        soft = rng.uniform(0.05, 0.4)
        cover = np.maximum(cover, np.clip((1 - rr) / soft, 0, 1))
    level = rng.uniform(0.0, 0.3) if rng.random() < 0.75 else rng.uniform(0.7, 1.0)
    film = level + rng.uniform(0, 0.02) * rng.standard_normal((n, n))
    a = rng.uniform(0.6, 1.0) * cover
    return np.clip(t * (1 - a) + film * a, 0, 1).astype(np.float32)


def hard_negative(t, rng):
    """A clean tile blurred or given a global gain: not a fold, not a stain."""
    if rng.random() < 0.5:
        return ndimage.gaussian_filter(t, rng.uniform(1, 4)).astype(np.float32)
    return np.clip(t * rng.uniform(0.5, 1.5) + rng.uniform(-0.1, 0.1), 0, 1).astype(np.float32)


def make_set(images, n, seed):
    """(n, 64, 64) tiles and (n, 2) labels: a third clean (a tenth of them hard negatives), a third fold,
    a third stain."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, TILE, TILE), np.float32)
    y = np.zeros((n, 2), np.float32)
    for i in range(n):
        t = random_crop(images, rng)
        k = i % 3
        if k == 0:
            x[i] = hard_negative(t, rng) if rng.random() < 0.1 else t
        elif k == 1:
            x[i], y[i, 0] = sim_fold(t, rng), 1
        else:
            x[i], y[i, 1] = sim_stain(t, rng), 1
    return x, y


# ---------------------------------------------------------------------------------------------- model


def build_net():
    import torch.nn as nn

    class ArtefactNet(nn.Module):
        """Per-location fold / stain logits; a tile's logit per kind is their maximum."""

        def __init__(self):
            super().__init__()
            layers, c_in = [], 1
            for c, s in zip(CHANNELS, STRIDES):
                layers += [nn.Conv2d(c_in, c, 3, stride=s, padding=1), nn.ReLU()]
                c_in = c
            self.body = nn.Sequential(*layers)
            self.head = nn.Conv2d(c_in, len(KINDS), 1)

        def forward(self, x):
            return self.head(self.body(x - 0.5)).amax(dim=(2, 3))

    return ArtefactNet()


def recall_at_fpr(scores_clean, scores_pos, fpr=0.02):
    cut = np.quantile(scores_clean, 1 - fpr)
    return float((scores_pos > cut).mean())


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("NEUROADDA_DATA", REPO.parent / "shared" / "em_data")))
    ap.add_argument("--out", type=Path, default=REPO / "python" / "neuroadda_rt" / "data")
    ap.add_argument("--steps", type=int, default=30000)
    ap.add_argument("--n-train", type=int, default=150000)
    ap.add_argument("--n-val", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export-only", action="store_true", help="rebuild the ONNX file from the safetensors weights")
    args = ap.parse_args(argv)
    if args.export_only:
        export_only(args.out)
        return 0
    torch.manual_seed(args.seed)
    t0 = time.time()
    xtr, ytr = make_set(load_images(args.data, "train"), args.n_train, args.seed)
    xva, yva = make_set(load_images(args.data, "val"), args.n_val, args.seed + 1)
    print(f"data {time.time() - t0:.0f} s: train {len(xtr)}, val {len(xva)}", flush=True)
    net = build_net()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(args.seed + 2)
    xt, yt = torch.from_numpy(xtr[:, None]), torch.from_numpy(ytr)
    log = []
    for step in range(args.steps):
        idx = torch.from_numpy(rng.integers(0, len(xtr), args.batch))
        loss = loss_fn(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 1000 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": float(loss.detach())})
            print(f"step {step} loss {float(loss.detach()):.4f} {time.time() - t0:.0f} s", flush=True)
    net.eval()
    with torch.no_grad():
        sv = torch.cat([net(torch.from_numpy(xva[i:i + 256, None])) for i in range(0, len(xva), 256)]).numpy()
    clean = yva.sum(1) == 0
    val = {kind: recall_at_fpr(sv[clean, j], sv[yva[:, j] == 1, j]) for j, kind in enumerate(KINDS)}
    print("validation recall at 2% false positives:", val, flush=True)
    write_outputs(net, args, log, val, time.time() - t0)
    return 0


def export_onnx(net, path: Path) -> None:
    """ONNX (opset 18) with dynamic batch and tile size, without the exporter's per-node provenance (stack
    traces with local paths), written atomically."""
    import torch

    from neuroadda_rt._atomic import atomic_path

    net.eval()
    example = torch.rand(2, 1, TILE, TILE)
    n, h, w = torch.export.Dim("batch"), torch.export.Dim("height", min=16), torch.export.Dim("width", min=16)
    program = torch.onnx.export(net, (example,), None, input_names=["tiles"], output_names=["logits"],
                                dynamic_shapes={"x": {0: n, 2: h, 3: w}}, opset_version=18, dynamo=True,
                                external_data=False, verbose=False)
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.metadata_props[:]
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(proto.SerializeToString())


def export_only(out: Path) -> None:
    """Rebuild the ONNX file from the committed safetensors weights (no training)."""
    from safetensors.torch import load_file

    net = build_net()
    net.load_state_dict(load_file(str(out / "qc_artefact_net.safetensors")))
    export_onnx(net, out / "qc_artefact_net.onnx")


def write_outputs(net, args, log, val, seconds):
    import torch
    from safetensors.torch import save_file

    from neuroadda_rt._atomic import atomic_path

    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "qc_artefact_net.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    export_onnx(net, args.out / "qc_artefact_net.onnx")
    record = {"kinds": list(KINDS), "tile": TILE, "channels": list(CHANNELS), "strides": list(STRIDES),
              "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "n_train": args.n_train,
              "n_val": args.n_val, "train_data": "EPFL hippocampus train volume, C. elegans NEUBIAS slices 0-15, "
              "FAFB TEMCA2 tissue tiles", "val_data": "EPFL hippocampus test volume, C. elegans slices 16-20",
              "simulator": "tools/train_qc_artefact_net.py (sim_fold, sim_stain, hard_negative); not apply_artefact",
              "validation_recall_at_2pct_fp": val, "loss_log": log, "seconds": round(seconds, 1),
              "torch": torch.__version__}
    with atomic_path(args.out / "qc_artefact_net.json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
