"""The NeuroADDA workflow: rank sources, choose tiles to annotate, fine-tune, evaluate.

This module is the public home of the workflow API (``neuroadda_rt.rank_sources`` etc. resolve
here) and of :func:`run_workflow`, which chains the steps and writes everything a lab needs:

* without labels, it stops after tile selection and writes the **annotation hand-off** (see
  :func:`write_annotation`): the chosen tiles as TIFF files, one multi-page stack, a CSV and a JSON
  of coordinates, and an empty ``labels/`` folder to paint into with Fiji or napari;
* with labels (an oracle label volume aligned with the target, or a folder of painted label
  TIFFs), it fine-tunes the top-ranked source and trains a network from scratch on the same tiles
  with the same recipe, evaluates both (and the source as-is) on held-out tiles, and writes a run
  directory (``run.json`` plus the models) that :func:`~neuroadda_rt.report.write_report` renders.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _atomic
from ._digest import bytes_sha256
from ._sources import as_volume, volume_shape
from .errors import FormatError, InputValueError, ShapeError, require
from .evaluation import Evaluation, evaluate
from .io import read_image_2d, read_image_stack
from .package import ModelPackage
from .ranking import RankedSource, SourceRanking, rank_sources
from .report import write_report
from .selection import TileSelection, select_tiles
from .tiles import extract_tiles, sample_tiles
from .training import finetune, train_from_scratch

log = logging.getLogger("neuroadda_rt")

__all__ = ["rank_sources", "SourceRanking", "RankedSource", "select_tiles", "TileSelection", "finetune",
           "train_from_scratch", "evaluate", "run_workflow", "WorkflowResult", "write_annotation",
           "read_annotation", "ANNOTATION_FORMAT"]

ANNOTATION_FORMAT = "neuroadda_rt.annotation/1"
RUN_FORMAT = "neuroadda_rt.run/1"


# --------------------------------------------------------------------------------------------
# annotation hand-off
# --------------------------------------------------------------------------------------------
def _tile_name(i: int, coord) -> str:
    c = [int(v) for v in coord]
    where = (f"z{c[0]}_y{c[1]}_x{c[2]}" if len(c) == 3 else f"y{c[0]}_x{c[1]}")
    return f"tile_{i:03d}_{where}"


def _sha(a: np.ndarray) -> str:
    # this exact byte layout is what existing tiles.json files hold: keep it
    a = np.ascontiguousarray(a)
    return bytes_sha256(repr((a.shape, str(a.dtype))).encode() + a.tobytes())


def write_annotation(selection: TileSelection, out_dir, *, tiles: np.ndarray | None = None,
                     target: str | None = None) -> Path:
    """Write the chosen tiles for annotation in Fiji or napari.

    Layout of ``out_dir``::

        images/tile_000_z3_y128_x64.tif   one raw tile per file (the volume's dtype)
        tiles.tif                         all tiles as one multi-page stack (same order)
        labels/                           paint instance labels here, same file names
        tiles.csv                         name, z, y, x, height, width, uncertainty
        tiles.json                        the same plus the selection, model, target and checksums
        README.txt                        what to do

    Parameters
    ----------
    selection : TileSelection
        From :func:`select_tiles`.
    out_dir : path
        Created if missing; files are written atomically (existing labels are kept).
    tiles : ndarray, optional
        The raw tiles (default ``selection.tiles``).
    target : str, optional
        The target path, recorded so ``finetune --labels`` can find it again.

    Returns
    -------
    Path
        ``out_dir``.
    """
    tifffile = _tifffile()
    tiles = selection.tiles if tiles is None else tiles
    if tiles is None:
        raise InputValueError("expected the chosen tiles (select_tiles(..., keep_tiles=True)), got none")
    tiles = np.asarray(tiles)
    if len(tiles) != len(selection.coords):
        raise ShapeError(f"expected {len(selection.coords)} tiles for the selection, got {len(tiles)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    names = [_tile_name(i, c) for i, c in enumerate(selection.coords)]
    for name, tile in zip(names, tiles):
        _atomic_tiff(tifffile, out / "images" / f"{name}.tif", tile)
    _atomic_tiff(tifffile, out / "tiles.tif", tiles)
    ndim = selection.coords.shape[1]
    axes = ["z", "y", "x"][3 - ndim:]
    lines = ["name," + ",".join(axes) + ",height,width,uncertainty"]
    for name, c, s in zip(names, selection.coords, selection.scores):
        lines.append(f"{name}," + ",".join(str(int(v)) for v in c) + f",{tiles.shape[1]},{tiles.shape[2]},{s:.6g}")
    _atomic.write_text(out / "tiles.csv", "\n".join(lines) + "\n")
    meta = {
        "format": ANNOTATION_FORMAT,
        "target": target if target is not None else selection.settings.get("target", {}).get("path"),
        "tile_size": int(selection.tile_size),
        "axes": axes,
        "tiles": [{"name": nm, "coords": [int(v) for v in c], "uncertainty": float(s), "sha256": _sha(t),
                   "shape": list(t.shape), "dtype": str(t.dtype)}
                  for nm, c, s, t in zip(names, selection.coords, selection.scores, tiles)],
        "selection": selection.to_dict(),
    }
    _atomic.write_json(out / "tiles.json", meta)
    _atomic.write_text(out / "README.txt", _annotation_readme(out, names, selection.tile_size))
    return out


_ANNOTATION_README = """\
neuroadda_rt annotation hand-off: {n} tiles of {size}x{size} pixels chosen for annotation.

1. Open images/ (one TIFF per tile) or tiles.tif (all tiles as one stack) in Fiji or napari.
2. Paint instance labels (one integer id per neurite, 0 = membrane/background) for every tile.
3. Save each label image into labels/ under the SAME file name as its image
   (images/{example}.tif -> labels/{example}.tif), as an integer TIFF of the same size,
   or save all labels as one stack labels/tiles.tif in the order of tiles.csv.
4. Run:  neuroadda-rt finetune {folder} --labels {labels} --out finetuned_model

The file names carry the tile coordinates (z, y, x of the top-left corner in the target volume);
tiles.json records them with a checksum of every image, and finetune refuses labels that do not match.
"""


def _annotation_readme(out: Path, names: list[str], size: int) -> str:
    import shlex

    # The real first file name and the real folder: a pattern that did not match the files, and a literal
    # "{this folder}", sent annotators guessing.
    folder = out.resolve()
    return _ANNOTATION_README.format(n=len(names), size=size, example=names[0] if names else "tile_000_z0_y0_x0",
                                     folder=shlex.quote(str(folder)), labels=shlex.quote(str(folder / "labels")))


def _tifffile():
    return require("tifffile", "io")


def _atomic_tiff(tifffile, path: Path, array: np.ndarray) -> None:
    with _atomic.atomic_path(path) as tmp:
        # minisblack: a 3- or 4-page stack must not be taken for an RGB(A) image
        tifffile.imwrite(tmp, np.ascontiguousarray(array), photometric="minisblack")


_NAME_RE = re.compile(r"^(tile_\d{3}_(?:z\d+_)?y\d+_x\d+)\.(tif|tiff|png)$", re.IGNORECASE)


def read_annotation(annotation_dir, labels_dir=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read an annotation hand-off back: the tile images and the painted labels, checked.

    Every selected tile needs a label image of the same shape, named like its image (or one
    ``tiles.tif`` stack in ``labels_dir`` in the order of ``tiles.csv``). The images must still be
    the ones written (checksums), and a label file whose name (coordinates) is not among the
    selected tiles is refused.

    Returns
    -------
    images : ndarray, (n, h, w), the raw tiles
    labels : ndarray of uint32, (n, h, w); uint64 when any painted id is >= 2**32. Ids are kept
        exactly as painted (never relabelled or truncated), so distinct ids stay distinct.
    meta : dict, the parsed ``tiles.json``

    Raises
    ------
    FileNotFoundError, FormatError, ShapeError
        With a message naming the offending file.
    """
    ann = Path(annotation_dir)
    meta_path = ann / "tiles.json"
    if not ann.is_dir():
        raise FileNotFoundError(f"annotation folder not found: {ann}")
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: expected an annotation folder written by "
                                f"`neuroadda-rt select`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        entries = meta["tiles"]
    except (ValueError, KeyError) as exc:
        raise FormatError(f"{meta_path}: not an annotation manifest ({exc})") from exc
    labels_dir = Path(labels_dir) if labels_dir is not None else ann / "labels"
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"labels folder not found: {labels_dir}")
    # Every problem is collected and reported at once: an annotator fixing one file per run was the old cost.
    problems: list[tuple[type[Exception], str]] = []
    images = []
    for e in entries:
        p = ann / "images" / f"{e['name']}.tif"
        if not p.exists():
            problems.append((FileNotFoundError, f"tile image missing: {p}"))
            images.append(None)
            continue
        im = read_image_2d(p)
        if _sha(im) != e["sha256"]:
            problems.append((FormatError, f"{p}: the tile image changed since selection (checksum mismatch); "
                                          f"expected the tile at {tuple(e['coords'])}"))
        images.append(im)
    expected = {e["name"]: e for e in entries}
    stack = labels_dir / "tiles.tif"
    found: dict[str, Path] = {}
    for p in sorted(labels_dir.iterdir()):
        m = _NAME_RE.match(p.name)
        if m:
            if m.group(1) not in expected:
                problems.append((FormatError, f"{p}: label file does not match any selected tile (expected one of "
                                              f"{sorted(expected)[:3]}{'...' if len(expected) > 3 else ''}); "
                                              f"its coordinates differ from the selection"))
                continue
            found[m.group(1)] = p
    labels = []
    if not found and stack.exists():
        arr = read_image_stack(stack, kind="labels")
        if arr.shape[0] != len(entries):
            problems.append((ShapeError, f"{stack}: expected {len(entries)} label pages, got {arr.shape[0]}"))
        else:
            for e, page, im in zip(entries, arr, images):
                where = f"{stack}: page for {e['name']}"
                why = _unpainted(page)
                if im is not None and page.shape != im.shape:
                    problems.append((ShapeError, f"{where} has shape {page.shape}, expected {im.shape}"))
                elif why is not None:
                    problems.append((FormatError, f"{where} {why}"))
                labels.append(page)
    else:
        missing = [e["name"] for e in entries if e["name"] not in found]
        if missing:
            problems.append((FileNotFoundError,
                             f"no label for tile{'s' if len(missing) > 1 else ''} {', '.join(missing)} in "
                             f"{labels_dir} ({len(missing)} of {len(entries)} missing; expected files named like "
                             f"{missing[0]}.tif)"))
        for e, im in zip(entries, images):
            p = found.get(e["name"])
            if p is None:
                continue
            try:
                lab = read_image_2d(p, kind="labels")
            except FormatError as exc:
                problems.append((FormatError, str(exc)))
                continue
            why = _unpainted(lab)
            if im is not None and lab.shape != im.shape:
                problems.append((ShapeError, f"{p}: label has shape {lab.shape}, expected {im.shape} like its tile "
                                             f"at {tuple(e['coords'])}"))
            elif why is not None:
                problems.append((FormatError, f"{p}: {why}"))
            labels.append(lab)
    if problems:
        kinds = {k for k, _ in problems}
        kind = kinds.pop() if len(kinds) == 1 else FormatError
        if len(problems) == 1:
            raise kind(problems[0][1])
        raise kind(f"{len(problems)} problems in {ann}: " + "; ".join(m for _, m in problems))
    return np.stack(images), np.stack(labels), meta


def _unpainted(labels: np.ndarray) -> str | None:
    """Why a label image cannot be a painted instance annotation, or None when it can.

    A tile of at least 128 px of neuropil always crosses membranes, so one value everywhere (an all-ones
    float mask, an empty canvas) means nothing was painted, not one huge neurite.
    """
    if labels.size and labels.min() == labels.max():
        return (f"one value ({labels.flat[0]}) everywhere: nothing was painted (expected instance ids, one per "
                f"neurite, with 0 or other ids between them)")
    return None


# --------------------------------------------------------------------------------------------
# helpers for held-out evaluation tiles
# --------------------------------------------------------------------------------------------
def _exclusion_mask(shape: tuple[int, ...], coords: np.ndarray, size: int) -> np.ndarray:
    """Boolean mask of tile *centres* whose tile would not overlap any chosen tile.

    ``sample_tiles`` treats a start ``p`` as eligible when the voxel at ``p + size//2`` is in the
    mask; a tile at ``p`` overlaps one at ``c`` when ``|p - c| < size`` on both in-plane axes.
    """
    mask = np.ones(shape, dtype=bool)
    h = size // 2
    for c in np.asarray(coords, dtype=np.int64):
        *z, y, x = (int(v) for v in c)
        ys = slice(max(0, y - size + 1 + h), max(0, y + size + h))
        xs = slice(max(0, x - size + 1 + h), max(0, x + size + h))
        mask[(*z, ys, xs)] = False
    return mask


def _held_out_tiles(volume, label_volume, coords, size: int, n_test: int, seed: int):
    shape = volume_shape(volume)
    mask = _exclusion_mask(shape, coords, size)
    try:
        t = sample_tiles(volume, n_test, size, seed=seed + 1_000_003, mask=mask)
    except InputValueError as exc:
        raise InputValueError(f"no room for held-out evaluation tiles of {size}x{size} away from the "
                              f"annotated tiles in a volume of shape {shape}; pass test=(images, labels)") from exc
    return t.tiles, np.asarray(extract_tiles(label_volume, t.coords, size)), t.coords


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class WorkflowResult:
    """What :func:`run_workflow` produced (everything is also on disk in ``run_dir``)."""

    run_dir: Path
    ranking: SourceRanking
    selection: TileSelection
    annotation_dir: Path
    finetuned: Any = None
    scratch: Any = None
    evaluation: dict = field(default_factory=dict)
    report: Path | None = None
    status: str = "awaiting_labels"

    def __repr__(self) -> str:
        return (f"WorkflowResult(status={self.status!r}, best={self.ranking[0].name!r}, "
                f"tiles={len(self.selection)}, run_dir={str(self.run_dir)!r})")


def _to_jsonable(obj):
    """Settings and evaluations (dataclasses, NumPy values) as plain JSON types."""
    if isinstance(obj, Evaluation):
        return obj.to_dict()
    if is_dataclass(obj) and not isinstance(obj, type):
        return _to_jsonable(asdict(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _save_package(pkg: ModelPackage, dest: Path) -> str:
    """Put a trained package at ``dest`` (replacing what is there, atomically); return the path."""
    dest = Path(dest)
    if pkg.path.resolve() != dest.resolve():
        pkg.save(dest, overwrite=True)
    return str(dest)


def train_pair(model, images, labels, *, out_dir, train: dict | None = None, progress: bool = False,
               device: str = "auto"):
    """Fine-tune ``model`` and train its architecture from scratch on the same tiles and recipe.

    Returns ``(finetuned, scratch, timings)``; checkpoints go to ``out_dir/checkpoints/`` so an
    interrupted call resumes.
    """
    train = dict(train or {})
    out_dir = Path(out_dir)
    timings = {}
    t0 = time.perf_counter()
    ft = finetune(model, images, labels, checkpoint_dir=out_dir / "checkpoints" / "finetuned", progress=progress,
                  device=device, out=out_dir / "models" / "finetuned", overwrite=True, **train)
    timings["finetune"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc = train_from_scratch(model, images, labels, checkpoint_dir=out_dir / "checkpoints" / "scratch",
                            progress=progress, device=device, out=out_dir / "models" / "scratch", overwrite=True,
                            **train)
    timings["scratch"] = time.perf_counter() - t0
    return ft, sc, timings


def _label_tiles(labels, volume, selection: TileSelection):
    """Label tiles for the selection from an oracle volume or a painted-labels folder."""
    size = int(selection.tile_size)
    if isinstance(labels, (str, os.PathLike)) and Path(labels).is_dir():
        p = Path(labels)
        ann = p.parent if not (p / "tiles.json").exists() else p
        lab_dir = p if not (p / "tiles.json").exists() else p / "labels"
        _, lab, meta = read_annotation(ann, lab_dir)
        coords = np.asarray([e["coords"] for e in meta["tiles"]], dtype=np.int64)
        if coords.shape != selection.coords.shape or not np.array_equal(coords, selection.coords):
            raise FormatError(f"{labels}: the annotated tiles' coordinates do not match this selection")
        return lab, None
    lab_vol = as_volume(labels, what="labels")
    if volume_shape(lab_vol) != volume_shape(volume):
        raise ShapeError(f"expected labels of the target's shape {volume_shape(volume)}, "
                         f"got {volume_shape(lab_vol)}")
    return np.asarray(extract_tiles(lab_vol, selection.coords, size)), lab_vol


# --------------------------------------------------------------------------------------------
# the workflow
# --------------------------------------------------------------------------------------------
def run_workflow(target, zoo, *, n: int = 4, labels=None, out_dir="neuroadda_run", strategy: str = "median",
                 n_tiles: int = 256, tile_size: int | None = None, pool: int = 2048, seed: int = 0,
                 n_permutations: int = 200, measure: str = "entropy", train: dict | None = None,
                 test=None, n_test: int = 8, cache_dir=None, progress: bool = False, backend: str = "auto",
                 device: str = "auto", report: bool = True, extra_settings: dict | None = None,
                 target_modality: str | None = None, target_voxel_size_nm=None) -> WorkflowResult:
    """Run NeuroADDA end to end: rank, select, (annotate,) fine-tune vs scratch, evaluate, report.

    Parameters
    ----------
    target : path, ndarray, Volume or Dataset
        The new EM volume (raw intensities; read, never modified).
    zoo : Zoo, path or sequence of packages
        Candidate source models.
    n : int
        Tiles to annotate.
    labels : None, ndarray/path of a label volume, or path of a painted-labels folder
        None stops after selection and writes the annotation hand-off. A label volume aligned
        with ``target`` acts as an oracle (synthetic data, benchmarks). A folder is read with
        :func:`read_annotation` and must match this run's selection.
    out_dir : path
        Run directory: ``ranking.json``, ``selection.json``, ``annotation/``, ``models/``,
        ``run.json`` and ``report.html``.
    strategy, pool, measure
        See :func:`select_tiles`.
    n_tiles, tile_size, n_permutations, cache_dir
        See :func:`rank_sources`. ``tile_size`` defaults to each source's reference tile size for the
        ranking, then to the best source's for every later step (a target slice smaller than it gets
        the largest multiple of 16 that fits, with a warning).
    train : dict, optional
        Training settings passed to ``finetune`` and ``train_from_scratch`` alike (``steps``,
        ``lr``, ``batch_size``, ``augment``, ...).
    test : (images, labels), optional
        Held-out evaluation tiles. Default: ``n_test`` random tiles of the oracle label volume
        that do not overlap the annotated ones (no evaluation with painted labels only).
    seed : int
        Seeds every step.
    progress : bool
        Progress bars for every long step.
    report : bool
        Write ``report.html`` at the end.
    target_modality, target_voxel_size_nm : optional
        The target's modality and voxel size (nm), for the ranking's warnings (:func:`rank_sources`).

    Returns
    -------
    WorkflowResult

    Examples
    --------
    >>> import neuroadda_rt as nr
    >>> res = nr.run_workflow("new_volume.h5:raw", nr.default_zoo(), n=4, out_dir="run1")  # doctest: +SKIP
    >>> # ... paint run1/annotation/labels/, then:
    >>> res = nr.run_workflow("new_volume.h5:raw", nr.default_zoo(), n=4, out_dir="run1",
    ...                       labels="run1/annotation/labels")                               # doctest: +SKIP
    >>> res.evaluation["finetuned"]["overall"]["vi_total"]                                   # doctest: +SKIP
    """
    t_start = time.perf_counter()
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    volume = as_volume(target)
    timings: dict[str, float] = {}
    train = dict(train or {})
    train.setdefault("seed", seed)

    t0 = time.perf_counter()
    ranking = rank_sources(volume, zoo, n_tiles=n_tiles, tile_size=tile_size, seed=seed,
                           n_permutations=n_permutations, cache_dir=cache_dir, progress=progress,
                           backend=backend, device=device, target_modality=target_modality,
                           target_voxel_size_nm=target_voxel_size_nm)
    if isinstance(target, (str, os.PathLike)):
        ranking.settings["target"]["path"] = str(target)
    timings["rank"] = time.perf_counter() - t0
    ranking.to_json(run_dir / "ranking.json")
    best = ranking.best
    if tile_size is None:  # the best source's tile size (already fitted to the target by the ranking)
        tile_size = ranking.best_tile_size or 256

    t0 = time.perf_counter()
    selection = select_tiles(volume, best, n, strategy=strategy, pool=pool, tile_size=tile_size, seed=seed,
                             measure=measure, backend=backend, device=device, progress=progress)
    if isinstance(target, (str, os.PathLike)):
        selection.settings["target"]["path"] = str(target)
    timings["select"] = time.perf_counter() - t0
    selection.to_json(run_dir / "selection.json")
    # a gallery of the most uncertain pool tiles (the artefacts the median rule avoids) for the report
    _save_gallery(run_dir, volume, selection)
    target_path = str(target) if isinstance(target, (str, os.PathLike)) else None
    ann_dir = write_annotation(selection, run_dir / "annotation", target=target_path)

    settings = {
        "n": int(n), "strategy": strategy, "n_tiles": int(n_tiles), "tile_size": int(tile_size), "pool": int(pool),
        "seed": int(seed), "n_permutations": int(n_permutations), "measure": measure, "n_test": int(n_test),
        "train": _to_jsonable(train), "backend": backend, "device": device,
        "target": ranking.settings.get("target"), "zoo": [e.name for e in ranking],
    }
    settings.update(_to_jsonable(extra_settings or {}))
    result = WorkflowResult(run_dir=run_dir, ranking=ranking, selection=selection, annotation_dir=ann_dir)
    run: dict[str, Any] = {"format": RUN_FORMAT, "status": "awaiting_labels", "settings": settings,
                           "best": {"name": ranking[0].name, "path": ranking[0].path},
                           "annotation_dir": "annotation", "timings_s": timings}

    if labels is None:
        run["total_s"] = time.perf_counter() - t_start
        _atomic.write_json(run_dir / "run.json", run)
        if report:
            result.report = write_report(run_dir)
        log.info("annotate the tiles in %s, then rerun with labels=", ann_dir)
        return result

    label_tiles, label_volume = _label_tiles(labels, volume, selection)
    images = selection.tiles
    _atomic.save_npy(run_dir / "annotation" / "label_tiles.npy", label_tiles)

    models_dir = run_dir / "models"
    models_dir.mkdir(exist_ok=True)
    ft, sc, t_train = train_pair(best, images, label_tiles, out_dir=run_dir, train=train, progress=progress,
                                 device=device)
    timings.update(t_train)
    ft_path = _save_package(ft, models_dir / "finetuned")
    sc_path = _save_package(sc, models_dir / "scratch")
    result.finetuned, result.scratch = ft, sc
    run["models"] = {"finetuned": "models/finetuned", "scratch": "models/scratch"}
    run["training"] = {"finetuned": ft.metrics["training"], "scratch": sc.metrics["training"]}

    if test is not None:
        test_images, test_labels = (np.asarray(a) for a in test)
        test_coords = None
    elif label_volume is not None:
        test_images, test_labels, test_coords = _held_out_tiles(volume, label_volume, selection.coords,
                                                                int(tile_size), int(n_test), int(seed))
    else:
        test_images = test_labels = test_coords = None
    evaluation: dict[str, Any] = {}
    if test_images is not None:
        t0 = time.perf_counter()
        for key, model in (("finetuned", ft), ("scratch", sc), ("source", best)):
            evaluation[key] = evaluate(model, test_images, test_labels, backend=backend, device=device,
                                       progress=progress).to_dict()
        timings["evaluate"] = time.perf_counter() - t0
        run["test"] = {"n": int(len(test_images)),
                       "source": "given" if test is not None else "oracle labels, away from the annotated tiles",
                       "coords": None if test_coords is None else np.asarray(test_coords).tolist()}
        vi_ft, vi_sc = (evaluation[k]["overall"]["vi_total"] for k in ("finetuned", "scratch"))
        if vi_sc > 0:
            run["vi_reduction"] = 1.0 - vi_ft / vi_sc
        vi_src = evaluation["source"]["overall"]["vi_total"]
        if vi_src > 0:  # the headline shows it: fine-tuning can score worse than the source as-is
            run["vi_reduction_vs_source"] = 1.0 - vi_ft / vi_src
    else:
        run["test"] = None
        log.warning("no held-out labels: skipping evaluation (pass test=(images, labels))")
    result.evaluation = evaluation
    run["evaluation"] = evaluation
    run["status"] = "complete"
    run["total_s"] = time.perf_counter() - t_start
    run["models_sha"] = {"finetuned": ft_path, "scratch": sc_path}
    result.status = "complete"
    _atomic.write_json(run_dir / "run.json", run)
    if report:
        result.report = write_report(run_dir)
    return result


def _save_gallery(run_dir: Path, volume, selection: TileSelection, k: int = 8) -> None:
    """Save the chosen tiles and the k most uncertain pool tiles (uint8 thumbnails) for the report."""
    size = int(selection.tile_size)
    order = np.lexsort((np.arange(len(selection.pool_scores)), -selection.pool_scores))[:k]
    top = np.asarray(extract_tiles(volume, selection.pool_coords[order], size))
    chosen = selection.tiles if selection.tiles is not None else np.asarray(
        extract_tiles(volume, selection.coords, size))
    gallery = {"chosen": _thumb(chosen), "uncertain": _thumb(top),
               "uncertain_scores": selection.pool_scores[order].astype(np.float64),
               "uncertain_coords": selection.pool_coords[order]}
    with _atomic.atomic_path(run_dir / "gallery.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **gallery)


def _thumb(tiles: np.ndarray, max_size: int = 192) -> np.ndarray:
    t = np.asarray(tiles)
    if t.size == 0:
        return np.zeros((0, 1, 1), np.uint8)
    step = max(1, int(np.ceil(t.shape[-1] / max_size)))
    t = t[:, ::step, ::step].astype(np.float64)
    lo, hi = np.percentile(t, 0.5), np.percentile(t, 99.5)
    return np.clip((t - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
