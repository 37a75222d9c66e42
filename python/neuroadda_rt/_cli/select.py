"""``neuroadda-rt select``: choose the target tiles to annotate and write them for Fiji / napari."""

from __future__ import annotations

from pathlib import Path

from ..selection import STRATEGIES
from ._common import add_common, add_target, open_target, print_json, resolve_model, tile_size_for


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "select", help="choose tiles to annotate (median uncertainty) and write them for Fiji/napari",
        description="Score a pool of random target tiles by the source model's uncertainty and write the chosen "
                    "tiles (TIFF, CSV, JSON of coordinates, an empty labels/ folder) into an annotation folder.")
    add_target(p)
    p.add_argument("--model", required=True,
                   help="source model package folder, or a ranking.json from `rank --out` (its best source)")
    p.add_argument("-n", type=int, default=4, help="tiles to annotate (default 4)")
    p.add_argument("--strategy", default="median",
                   choices=STRATEGIES,
                   help="selection rule (default median: NeuroADDA)")
    p.add_argument("--pool", type=int, default=2048, help="candidate tiles scored (default 2048)")
    p.add_argument("--measure", default="entropy", help="uncertainty measure (default entropy)")
    p.add_argument("--band", type=float, default=0.25, help="median-diverse: pool fraction around the median")
    p.add_argument("--min-slice-gap", type=int, default=10,
                   help="3-D: chosen tiles overlapping in y, x are at least this many slices apart (default 10)")
    p.add_argument("--coords", default=None,
                   help="CSV/JSON of tile corners to write instead of selecting (z,y,x or y,x per row)")
    p.add_argument("--out", required=True, help="annotation folder to write")
    add_common(p)
    p.set_defaults(func=run)


def _read_coords(path: str):
    """Tile corners from a JSON (list, {"coords": ...} or a tiles.json) or a CSV (a header naming z/y/x
    columns, as tiles.csv, or bare rows of 2 or 3 integers)."""
    import csv
    import json

    import numpy as np

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"coordinates file not found: {path}")
    text = p.read_text()
    if p.suffix == ".json":
        d = json.loads(text)
        if isinstance(d, dict):
            rows = d["coords"] if "coords" in d else [t["coords"] for t in d.get("tiles", [])]
        else:
            rows = d
    else:
        table = [r for r in csv.reader(text.splitlines()) if r]
        header = [h.strip().lower() for h in table[0]] if table else []
        if "y" in header and "x" in header:
            cols = [header.index(a) for a in ("z", "y", "x") if a in header]
            table = table[1:]
        else:
            cols = list(range(len(table[0]))) if table else []
        try:
            rows = [[int(float(r[c])) for c in cols] for r in table]
        except (ValueError, IndexError) as exc:
            raise ValueError(f"{path}: expected integer tile corners, got {exc}") from exc
    arr = np.asarray(rows, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3) or len(arr) == 0:
        raise ValueError(f"{path}: expected rows of y,x or z,y,x tile corners, got shape {arr.shape}")
    return arr


def run(args) -> int:
    import numpy as np

    from ..selection import TileSelection, select_tiles
    from ..workflow import write_annotation

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        # checked before minutes of scoring, not when the first tile is written
        raise NotADirectoryError(f"expected --out to be a folder (or a path that does not exist yet), got a "
                                 f"file: {out}")
    volume = open_target(args.target, args.key)
    model = None if args.coords and not Path(args.model).exists() else resolve_model(args.model)
    # --tile-size, else the ranking's (a ranking.json as --model), else the model's reference tile size
    args.tile_size = tile_size_for(args.tile_size, model, volume, ranking=args.model)
    if args.coords:
        from ..tiles import extract_tiles

        coords = _read_coords(args.coords)
        if coords.shape[1] != volume.ndim:
            raise ValueError(f"{args.coords}: expected {volume.ndim} coordinates per tile for a volume of shape "
                             f"{tuple(volume.shape)}, got {coords.shape[1]}")
        shape = tuple(int(v) for v in volume.shape)
        for i, c in enumerate(coords):
            *z, y, x = (int(v) for v in c)
            if min(c) < 0 or y + args.tile_size > shape[-2] or x + args.tile_size > shape[-1] or (z and z[0] >= shape[0]):
                raise ValueError(f"{args.coords}: tile {i} at {tuple(int(v) for v in c)} of size {args.tile_size} lies "
                                 f"outside the volume of shape {shape}")
        tiles = extract_tiles(volume, coords, args.tile_size)
        sel = TileSelection(coords=coords, scores=np.full(len(coords), np.nan), pool_coords=coords,
                            pool_scores=np.full(len(coords), np.nan), indices=np.arange(len(coords)),
                            tile_size=args.tile_size, strategy="given", measure=args.measure,
                            settings={"coords_file": args.coords, "target": {"path": args.target}}, tiles=tiles)
    else:
        sel = select_tiles(volume, model, args.n, strategy=args.strategy, pool=args.pool, tile_size=args.tile_size,
                           seed=args.seed, measure=args.measure, band=args.band, min_slice_gap=args.min_slice_gap, backend=args.backend,
                           device=args.device, progress=not args.no_progress)
        sel.settings["target"]["path"] = args.target
    out = write_annotation(sel, args.out, target=args.target)
    if args.json:
        print_json({"annotation_dir": str(out), "coords": sel.coords.tolist(),
                    "scores": [float(s) for s in sel.scores], "strategy": sel.strategy})
        return 0
    for i, (c, s) in enumerate(zip(sel.coords, sel.scores)):
        print(f"tile {i}: corner {tuple(int(v) for v in c)}  uncertainty {s:.4f}")
    print(f"annotation folder: {out}  (paint labels into {Path(out) / 'labels'}, then `neuroadda-rt finetune "
          f"{out} --out MODEL_DIR`)")
    return 0
