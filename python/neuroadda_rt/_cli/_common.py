"""Argument helpers shared by the workflow subcommands (rank, select, finetune, evaluate, demo)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import FormatError
from ..runtime import BACKENDS


def print_json(obj) -> None:
    """Print ``obj`` as the machine-readable output of a ``--json`` command."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def add_target(p: argparse.ArgumentParser, name: str = "target") -> None:
    p.add_argument(name, help="EM volume: HDF5 (file.h5:dataset), zarr/N5, TIFF stack, folder of slices, .npy")
    p.add_argument("--key", default=None, help="dataset inside an HDF5/zarr/N5 container")


def add_common(p: argparse.ArgumentParser, *, tile_size: int | None = None, seed: bool = True) -> None:
    p.add_argument("--tile-size", type=int, default=tile_size,
                   help="tile edge in pixels (default: the source model's reference tile size, 256 when it "
                        "records none; a smaller target slice gets the largest multiple of 16 that fits)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="inference backend (default auto: ONNX Runtime)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="inference device")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def open_target(path: str, key: str | None):
    """Open a target volume, with a one-line error for a missing path."""
    from ..io import open_volume

    base = Path(path.split(":")[0]) if ":" in path and not Path(path).exists() else Path(path)
    if not base.exists():
        raise FileNotFoundError(f"target volume not found: {path}")
    return open_volume(path, key=key) if key else open_volume(path)


def open_zoo(spec: str | None):
    """``None``/"default" -> the bundled real-EM zoo; "synthetic" -> the bundled synthetic zoo; a folder ->
    ``Zoo(folder)`` (or one package). A folder without any model package is an error that says what was found."""
    if spec in (None, "default"):
        from ..package import default_zoo

        return default_zoo()
    if spec == "synthetic":
        from ..package import synthetic_zoo

        return synthetic_zoo()
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"zoo not found: {spec}")
    if (p / "model.json").exists():
        return [str(p)]
    from ..package import Zoo

    zoo = Zoo(p)
    if len(zoo) == 0:
        raise FormatError(empty_zoo_message(p))
    return zoo


def empty_zoo_message(p: Path) -> str:
    """Why a folder is no zoo: it holds no ``<name>/model.json`` (say what it holds instead)."""
    found = sorted({f.name for f in Path(p).glob("*/*.json")})[:5]
    hint = (f"; its sub-folders hold {', '.join(found)} instead (a study runner's sources are not model "
            f"packages: build a zoo with `neuroadda-rt zoo build OUT --from-datasets ...`)" if found else
            "; build one with `neuroadda-rt zoo build OUT --from-datasets MANIFEST.json ...`")
    return f"{p}: expected a zoo folder of model packages (<name>/model.json), got none{hint}"


def tile_size_for(given: int | None, model, volume=None, *, ranking: str | None = None) -> int:
    """The tile edge of a command: ``--tile-size`` when given, else the one ``ranking`` (a ranking.json)
    recorded for its best source, else the model's reference tile size; fitted to the target's slices
    with a message on stderr when they are smaller."""
    from .._sources import fit_tile_size, reference_tile_size

    if given is not None:
        return int(given)
    size = None
    if ranking is not None and Path(ranking).is_file() and Path(ranking).suffix == ".json":
        from ..ranking import tile_size_of

        size = tile_size_of(json.loads(Path(ranking).read_text(encoding="utf-8")))
    if size is None:
        size = reference_tile_size(model)
    if volume is not None:
        size, note = fit_tile_size(volume, size)
        if note:
            print(f"note: {note}", file=sys.stderr)
    return int(size)


def resolve_model(spec: str):
    """A model package folder, or a ``ranking.json`` whose best source is used."""
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {spec}")
    if p.is_file() and p.suffix == ".json":
        from ..ranking import SourceRanking

        return SourceRanking.from_json(p).best
    from ..package import load_model

    return load_model(p)
