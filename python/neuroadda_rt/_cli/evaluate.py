"""``neuroadda-rt evaluate``: VI split / merge / total and adapted Rand error of a model on labelled data."""

from __future__ import annotations

from pathlib import Path

from ..runtime import BACKENDS
from ._common import open_target, print_json, tile_size_for


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a model's segmentation (VI, adapted Rand error) on labelled images",
        description="Segment labelled images with a model package and score them by variation of information "
                    "(split, merge, total) and adapted Rand error, per tile and overall. Images and labels are "
                    "volumes of one shape (random tiles are scored) or an annotation folder with painted labels.")
    p.add_argument("model", help="model package folder")
    p.add_argument("images", help="image volume, or an annotation folder (then LABELS may be omitted)")
    p.add_argument("labels", nargs="?", default=None, help="instance label volume aligned with IMAGES")
    p.add_argument("--key", default=None, help="dataset key of the image container")
    p.add_argument("--labels-key", default=None, help="dataset key of the label container")
    p.add_argument("--n-tiles", type=int, default=16, help="random tiles scored (default 16)")
    p.add_argument("--tile-size", type=int, default=None,
                   help="tile edge (default: the model's reference tile size, 256 when it records none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tile sample")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation import evaluate
    from .._sources import load_package, volume_shape
    from ..tiles import extract_tiles, sample_tiles
    from ..workflow import read_annotation

    model = load_package(args.model)
    src = Path(args.images)
    if src.is_dir() and (src / "tiles.json").exists():
        images, labels, _ = read_annotation(src, args.labels)
    else:
        if args.labels is None:
            raise ValueError("expected a LABELS volume after IMAGES (or an annotation folder as IMAGES)")
        vol = open_target(args.images, args.key)
        lab = open_target(args.labels, args.labels_key)
        if volume_shape(vol) != volume_shape(lab):
            raise ValueError(f"expected labels of the images' shape {volume_shape(vol)}, got {volume_shape(lab)}")
        size = tile_size_for(args.tile_size, model, vol)
        t = sample_tiles(vol, args.n_tiles, size, seed=args.seed)
        images, labels = t.tiles, extract_tiles(lab, t.coords, size)
    ev = evaluate(model, images, labels, backend=args.backend, device=args.device, progress=not args.no_progress)
    if args.json:
        print_json(ev.to_dict())
        return 0
    print(f"{ev.model} on {len(images)} tiles: VI total {ev.vi_total:.4f} (split {ev.vi_split:.4f}, "
          f"merge {ev.vi_merge:.4f}), adapted Rand error {ev.adapted_rand_error:.4f}")
    return 0
