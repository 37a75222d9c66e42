"""Argument helpers shared by the workflow subcommands (rank, select, finetune, evaluate, demo)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..runtime import BACKENDS


def print_json(obj) -> None:
    """Print ``obj`` as the machine-readable output of a ``--json`` command."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def add_target(p: argparse.ArgumentParser, name: str = "target") -> None:
    p.add_argument(name, help="EM volume: HDF5 (file.h5:dataset), zarr/N5, TIFF stack, folder of slices, .npy")
    p.add_argument("--key", default=None, help="dataset inside an HDF5/zarr/N5 container")


def add_common(p: argparse.ArgumentParser, *, tile_size: int = 256, seed: bool = True) -> None:
    p.add_argument("--tile-size", type=int, default=tile_size, help=f"tile edge in pixels (default {tile_size})")
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
    """``None``/"default" -> the bundled zoo; a folder -> ``Zoo(folder)`` (or one package)."""
    if spec in (None, "default"):
        from ..package import default_zoo

        return default_zoo()
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"zoo not found: {spec}")
    if (p / "model.json").exists():
        return [str(p)]
    from ..package import Zoo

    return Zoo(p)


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
