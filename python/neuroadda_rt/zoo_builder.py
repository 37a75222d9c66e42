"""Build a zoo of source models from labelled EM data sets (``neuroadda-rt zoo build OUT --from-datasets``).

One model package per :class:`~neuroadda_rt.datasets.Dataset` manifest. Each package carries the
manifest's real metadata (name, organism, tissue, modality, voxel size, label kind) and a model card
in ``model.json``:

* ``training``: the data (manifest, split, slices, licence, citation), the recipe, the augmentation,
  the intensity rule, the command that rebuilds it;
* ``metrics.held_out``: VI (split, merge, total) and adapted Rand error on the manifest's held-out
  split, and ``metrics.validation_curve``: the validation VI of every evaluation during training.

The held-out split (``validation``, ``val`` or ``test``, the first one the manifest has with labels)
is divided by slice parity: even slices are the *validation* half (early stopping, the choice of the
segmentation threshold), odd slices the *test* half, touched once, after training, for the score the
model card reports. A held-out split of one slice is used for both (the card says so).

Training (:func:`neuroadda_rt.training.train_network`, the same engine as fine-tuning) runs up to
``max_steps``; every ``eval_every`` steps the network segments the validation half (threshold chosen
there from a fixed grid) and the best weights so far are kept. Training stops when the validation VI
has not improved for ``patience`` evaluations. Everything is resumable: per data set,
``<checkpoints>/<name>/`` holds the training checkpoint, the curve (``curve.json``) and the best weights;
a rerun resumes an interrupted training, skips finished training, and skips a package already written
with the same recipe and data. Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import _atomic
from ._digest import arrays_sha256, json_sha256
from .datasets import Dataset
from .errors import FormatError, InputValueError, ShapeError, require
from .evaluation import score_segmentation
from .io import intensity_rule, normalize_intensity
from .package import ModelPackage, Zoo, load_model, save_model
from .segmentation import segment, tune_threshold
from .tiles import sample_tiles

log = logging.getLogger(__name__)

__all__ = ["DatasetZooRecipe", "DEFAULT_DATASET_RECIPE", "build_zoo_from_datasets", "HELD_OUT_SPLITS"]

#: Splits taken as the held-out split, in this order of preference.
HELD_OUT_SPLITS = ("validation", "val", "test")

_BUILD_FORMAT = "neuroadda_rt.dataset-zoo-build/1"
_CURVE = "curve.json"
_BEST = "best.safetensors"


class _EarlyStop(Exception):
    """Raised by the validation callback to end training (the checkpoint of that step is written)."""


@dataclass(frozen=True)
class DatasetZooRecipe:
    """Settings of a zoo build from data sets (the defaults build the bundled real-EM zoo).

    Attributes
    ----------
    widths : tuple of int
        UNet widths per level (small: the whole bundled zoo ships in the wheel).
    representation : str
        ``"boundary"`` (membrane probability).
    feature_level, pooling
        Ranking features: encoder level and pooling of its map (as the synthetic zoo).
    max_steps : int
        Upper bound of optimizer steps; training usually stops earlier (``patience``).
    eval_every : int
        Steps between validation evaluations (and checkpoints).
    patience : int
        Evaluations without a validation-VI improvement of more than ``min_delta`` before stopping.
    min_delta : float
        Smallest VI decrease (bits) that counts as an improvement.
    lr, batch_size, patch_size, seed
        The optimizer and batches (``patch_size`` is clipped to the smallest training slice).
    intensity, blur, scale
        Augmentation beyond flips / rotations / elastic: intensity jitter (contrast, brightness,
        gamma, noise), Gaussian blur up to ``blur`` px, scale changes up to ``1 + scale``.
    normalization : str
        Intensity rule (``"percentile"``: 1st-99th percentile per input; suits data from different
        detectors).
    tile_size : int
        Edge of the reference tiles (clipped to the data: the largest multiple of 16 that fits).
    reference_tiles : int
        Number of reference tiles drawn from the training slices.
    thresholds : tuple of float
        Segmentation thresholds tried on the validation half.
    max_eval_slices : int
        At most this many validation slices per evaluation (evenly spaced), to bound its cost.
    """

    widths: tuple[int, ...] = (8, 16, 32, 64)
    representation: str = "boundary"
    feature_level: int = 2
    pooling: str = "mean+std"
    max_steps: int = 4000
    eval_every: int = 100
    patience: int = 4
    min_delta: float = 0.005
    lr: float = 1e-3
    batch_size: int = 4
    patch_size: int = 128
    seed: int = 0
    intensity: bool = True
    blur: float = 1.0
    scale: float = 0.15
    normalization: str = "percentile"
    tile_size: int = 128
    reference_tiles: int = 256
    thresholds: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    max_eval_slices: int = 8

    def __post_init__(self):
        for k in ("max_steps", "eval_every", "patience", "batch_size", "patch_size", "tile_size",
                  "reference_tiles", "max_eval_slices"):
            v = getattr(self, k)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise InputValueError(f"expected {k} a positive integer, got {v!r}")
        if not 0 <= self.feature_level < len(self.widths):
            raise InputValueError(f"expected feature_level in [0, {len(self.widths) - 1}], got {self.feature_level}")
        if self.tile_size < 16 or self.patch_size < 16:
            raise InputValueError(f"expected tile_size and patch_size >= 16, got {self.tile_size}, {self.patch_size}")
        if not self.thresholds or not all(0 < t < 1 for t in self.thresholds):
            raise InputValueError(f"expected thresholds in (0, 1), got {self.thresholds}")
        intensity_rule(self.normalization)  # validates the name

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["thresholds"] = list(self.thresholds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetZooRecipe":
        known = set(cls.__dataclass_fields__)
        d = {k: v for k, v in d.items() if k in known}
        for k in ("widths", "thresholds"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


#: The recipe fields that change training (the others only change packaging: no retraining). ``max_steps``
#: is not one: it only bounds a run (constant learning rate), so a larger bound extends a finished build.
_TRAIN_FIELDS = ("widths", "representation", "eval_every", "patience", "min_delta", "lr", "batch_size",
                 "patch_size", "seed", "intensity", "blur", "scale", "normalization", "thresholds", "max_eval_slices")

#: The bundled real-EM zoo's recipe (``neuroadda-rt zoo build OUT --from-datasets ...`` with no options).
DEFAULT_DATASET_RECIPE = DatasetZooRecipe()


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass
class _Data:
    """One manifest's training and held-out slices, raw and normalised."""

    dataset: Dataset
    manifest_path: str | None
    held_out: str
    train_raw: list[np.ndarray]
    train_labels: list[np.ndarray]
    val_idx: list[int]
    test_idx: list[int]
    held_raw: list[np.ndarray]
    held_labels: list[np.ndarray]
    notes: list[str] = field(default_factory=list)


def _slices(a: np.ndarray) -> list[np.ndarray]:
    a = np.asarray(a)
    if a.ndim == 2:
        return [a]
    if a.ndim == 3:
        return [a[i] for i in range(a.shape[0])]
    raise ShapeError(f"expected a 2-D image or 3-D stack, got shape {a.shape}")


def _load_data(item, data_root) -> _Data:
    """Read and check one manifest: labelled train split, labelled held-out split, labels matching images."""
    if isinstance(item, Dataset):
        ds, path = item, item.source
    else:
        path = str(item)
        ds = Dataset.from_json(path, data_root=data_root)
    where = path or ds.name
    if "train" not in ds.splits and ds.splits != ["all"]:
        raise FormatError(f"{where}: expected a 'train' split to train on, got splits {ds.splits}")
    train = "train" if "train" in ds.splits else "all"
    if not ds.has_labels(train):
        raise FormatError(f"{where}: data set {ds.name!r} is unlabelled (label_kind 'none' for split {train!r}); "
                          f"a zoo package is trained on labelled data")
    held = next((s for s in HELD_OUT_SPLITS if s in ds.splits and ds.has_labels(s)), None)
    if held is None:
        raise FormatError(f"{where}: expected a labelled held-out split (one of {list(HELD_OUT_SPLITS)}) to "
                          f"validate on, got splits {ds.splits}")
    data = []
    for split in (train, held):
        img = np.asarray(ds.image(split))
        lab = ds.labels(split)  # raises ShapeError when the labels do not match the image
        if lab.shape != img.shape:
            raise ShapeError(f"{where}: labels of split {split!r} have shape {lab.shape}, expected the image "
                             f"shape {img.shape}")
        if img.dtype.kind not in "uif":
            raise FormatError(f"{where}: expected a numeric image, got dtype {img.dtype}")
        ims, lbs = _slices(img), _slices(lab)
        empty = [i for i, lb in enumerate(lbs) if not lb.any()]
        if len(empty) == len(lbs):
            raise FormatError(f"{where}: the labels of split {split!r} hold no object (every pixel 0 = boundary); "
                              f"do they match the images?")
        data.append((ims, lbs))
    (tr_i, tr_l), (ho_i, ho_l) = data
    n = len(ho_i)
    notes = []
    if n == 1:
        val_idx = test_idx = [0]
        notes.append("the held-out split has one slice: validation and test are the same slice")
    else:
        val_idx, test_idx = list(range(0, n, 2)), list(range(1, n, 2))
    return _Data(ds, path, held, tr_i, tr_l, val_idx, test_idx, ho_i, ho_l, notes)


def _fit_size(size: int, data: _Data) -> int:
    """``size`` clipped to every slice the build cuts tiles from (a multiple of 16, at least 16)."""
    smallest = min(min(a.shape) for a in data.train_raw)
    if smallest >= size:
        return int(size)
    fit = (smallest // 16) * 16
    if fit < 16:
        raise ShapeError(f"{data.dataset.name}: expected training slices of at least 16x16 px, got {smallest} px")
    return int(fit)


def _reference_tiles(data: _Data, recipe: DatasetZooRecipe) -> tuple[np.ndarray, int]:
    """The training tiles a package's reference features are computed from, and their size: the same draw for
    every build of a recipe (``benchmarks/ranking_levels.py`` redraws them to re-embed at another level)."""
    tile = _fit_size(recipe.tile_size, data)
    stack = np.stack([im[:min(a.shape[0] for a in data.train_raw), :min(a.shape[1] for a in data.train_raw)]
                      for im in data.train_raw])
    return sample_tiles(stack, recipe.reference_tiles, tile, seed=recipe.seed).tiles, tile


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def _predict(net, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Boundary probabilities of normalised images with the torch network as it is now (eval mode)."""
    from .runtime import Predictor

    was_training = net.training
    net.eval()
    try:
        pred = Predictor(net, backend="torch", device="cpu", normalize=False, tile=256)
        out = []
        for im in images:
            p = pred.predict(np.asarray(im, dtype=np.float32))
            out.append(p[0] if p.ndim == 3 and p.shape[0] == 1 else p)
        return out
    finally:
        net.train(was_training)


def _validation_vi(probs, labels, representation: str, thresholds) -> tuple[float, float]:
    """(mean VI at the best threshold, that threshold) over the validation slices."""
    res = tune_threshold(list(probs), list(labels), representation, thresholds=list(thresholds))
    return float(res.vi) / len(probs), float(res.threshold)


def _scores(probs, labels, representation: str, threshold: float) -> dict[str, Any]:
    per = [score_segmentation(segment(p, representation, threshold=threshold), lb) for p, lb in zip(probs, labels)]
    out = {k: float(np.mean([s[k] for s in per])) for k in per[0]}
    out["per_slice"] = [{k: round(v, 5) for k, v in s.items()} for s in per]
    return out


def _evenly(idx: list[int], k: int) -> list[int]:
    if len(idx) <= k:
        return list(idx)
    pick = np.unique(np.round(np.linspace(0, len(idx) - 1, k)).astype(int))
    return [idx[i] for i in pick]


# --------------------------------------------------------------------------------------------
# one package
# --------------------------------------------------------------------------------------------
def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _state_to_file(net, path: Path) -> None:
    st = require("safetensors.torch", "runtime")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}
    with _atomic.atomic_path(path) as tmp:
        st.save_file(state, str(tmp))


def _state_from_file(net, path: Path) -> None:
    st = require("safetensors.torch", "runtime")
    net.load_state_dict(st.load_file(str(path)))


def _command(manifest_path, recipe: DatasetZooRecipe) -> str:
    args = ["neuroadda-rt", "zoo", "build", "OUT", "--from-datasets", str(manifest_path or "MANIFEST.json")]
    d, base = recipe.to_dict(), DEFAULT_DATASET_RECIPE.to_dict()
    flags = {"max_steps": "--max-steps", "eval_every": "--eval-every", "patience": "--patience", "lr": "--lr",
             "batch_size": "--batch-size", "patch_size": "--patch-size", "tile_size": "--tile-size",
             "seed": "--seed", "reference_tiles": "--reference-tiles"}
    for k, flag in flags.items():
        if d[k] != base[k]:
            args += [flag, str(d[k])]
    if d["widths"] != base["widths"]:
        args += ["--widths", ",".join(map(str, d["widths"]))]
    return " ".join(shlex.quote(a) for a in args) + " --data-root $NEUROADDA_DATA"


def _train_one(data: _Data, recipe: DatasetZooRecipe, ckpt: Path, *, device: str, progress: bool,
               report: Callable[[str], None], time_budget_s: float | None = None) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one data set's network; returns its curve record."""
    torch = require("torch", "torch")
    from .models import UNet
    from .training import TrainRecipe, train_network

    rule = intensity_rule(recipe.normalization)
    train_f = [normalize_intensity(im, rule) for im in data.train_raw]
    val_idx = _evenly(data.val_idx, recipe.max_eval_slices)
    val_f = [normalize_intensity(data.held_raw[i], rule) for i in val_idx]
    val_l = [data.held_labels[i] for i in val_idx]
    patch = _fit_size(recipe.patch_size, data)
    tr = TrainRecipe(steps=recipe.max_steps, lr=recipe.lr, batch_size=recipe.batch_size, patch_size=patch,
                     augment=True, seed=recipe.seed, intensity=recipe.intensity, blur=recipe.blur, scale=recipe.scale)
    key = json_sha256({"recipe": {k: v for k, v in recipe.to_dict().items() if k in _TRAIN_FIELDS},
                       "train": {k: v for k, v in tr.to_dict().items() if k != "steps"},
                       "data": arrays_sha256(*data.train_raw, *data.train_labels),
                       "val": arrays_sha256(*val_f, *val_l)})
    ckpt.mkdir(parents=True, exist_ok=True)
    curve_path = ckpt / _CURVE
    curve = _read_json(curve_path)
    if curve is None or curve.get("key") != key:
        if curve is not None:
            report(f"{data.dataset.name}: recipe or data changed since the last build; training from scratch")
            for f in ckpt.iterdir():
                if f.is_file():
                    f.unlink()
        curve = {"format": _BUILD_FORMAT, "key": key, "points": [], "best_step": None, "best_vi": None,
                 "best_threshold": None, "finished": False, "stop_reason": None, "seconds": 0.0,
                 "validation_slices": val_idx, "patch_size": patch, "train_recipe": tr.to_dict()}
    if curve["finished"] and _bound_lifted(curve, recipe.max_steps, time_budget_s):
        last = curve["points"][-1]["step"]
        report(f"{data.dataset.name}: extending the training that stopped at step {last} "
               f"({curve['stop_reason']}) up to max_steps {recipe.max_steps}")
        curve.setdefault("extended", []).append({"from_step": last, "stop_reason": curve["stop_reason"],
                                                 "max_steps": recipe.max_steps})
        curve.update(finished=False, stop_reason=None, train_recipe=tr.to_dict())
    if curve["finished"]:
        report(f"{data.dataset.name}: training finished earlier (best step {curve['best_step']}); not retrained")
        return curve

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = UNet(widths=recipe.widths, head=recipe.representation, feature_level=recipe.feature_level)
    done_steps = len(curve["points"])
    t_start = time.perf_counter()
    seconds_before = float(curve.get("seconds") or 0.0)
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if step % recipe.eval_every and step != recipe.max_steps:
            return
        t0 = time.perf_counter()
        probs = _predict(net, val_f)
        vi, th = _validation_vi(probs, val_l, recipe.representation, recipe.thresholds)
        point = {"step": step, "vi": round(vi, 5), "threshold": th,
                 "train_loss": round(float(np.mean(losses)) if losses else float("nan"), 5),
                 "eval_seconds": round(time.perf_counter() - t0, 2)}
        losses.clear()
        curve["points"] = [p for p in curve["points"] if p["step"] < step] + [point]
        if curve["best_vi"] is None or vi < curve["best_vi"] - recipe.min_delta:
            _state_to_file(net, ckpt / _BEST)
            curve.update(best_step=step, best_vi=round(vi, 5), best_threshold=th)
        since = sum(1 for p in curve["points"] if p["step"] > curve["best_step"])
        curve["seconds"] = round(seconds_before + time.perf_counter() - t_start, 1)
        stop = since >= recipe.patience
        over = time_budget_s is not None and curve["seconds"] >= time_budget_s
        if stop or over or step == recipe.max_steps:
            reason = (f"no validation-VI improvement > {recipe.min_delta} for {recipe.patience} evaluations" if stop
                      else f"compute budget of {time_budget_s:g} s wall-clock reached at step {step} (the same "
                           f"weights come from --max-steps {step})" if over
                      else f"max_steps {recipe.max_steps} reached")
            curve.update(finished=True, stop_reason=reason)
            stop = True
        _atomic.write_text(curve_path, json.dumps(curve, indent=1) + "\n")
        report(f"{data.dataset.name}: step {step}/{recipe.max_steps} validation VI {vi:.4f} (threshold {th:g}), "
               f"best {curve['best_vi']:.4f} at step {curve['best_step']}, "
               f"{curve['seconds']:.0f} s" + ("; stopping" if stop else ""))
        if stop:
            raise _EarlyStop

    if done_steps:
        report(f"{data.dataset.name}: resuming after {curve['points'][-1]['step']} steps")
    try:
        train_network(net, train_f, data.train_labels, recipe=tr, checkpoint_dir=ckpt,
                      checkpoint_every=recipe.eval_every, progress=progress, device=device, callback=on_step,
                      desc=f"zoo {data.dataset.name}")
    except _EarlyStop:
        pass
    if not curve["finished"]:  # the loop ended on its own (max_steps): on_step marked the last point
        curve.update(finished=True, stop_reason=f"max_steps {recipe.max_steps} reached")
        _atomic.write_text(curve_path, json.dumps(curve, indent=1) + "\n")
    return curve


def _bound_lifted(curve: dict, max_steps: int, time_budget_s: float | None) -> bool:
    """Whether a finished training stopped only at a bound (steps or time) that this build raises."""
    if not curve.get("points"):
        return False
    last = curve["points"][-1]["step"]
    reason = curve.get("stop_reason") or ""
    if reason.startswith("max_steps"):
        return max_steps > last
    if reason.startswith("compute budget"):
        return max_steps > last and (time_budget_s is None or time_budget_s > float(curve.get("seconds") or 0.0))
    return False  # early stopping (or an unknown reason) is final


def _package_one(data: _Data, recipe: DatasetZooRecipe, curve: dict, ckpt: Path, out: Path, *, build_key: str,
                 report: Callable[[str], None]) -> ModelPackage:
    """Write the package of a finished training: best weights, threshold, held-out scores, model card."""
    torch = require("torch", "torch")
    from .models import UNet
    from .training import TrainRecipe, describe_augmentation

    ds = data.dataset
    rule = intensity_rule(recipe.normalization)
    with torch.random.fork_rng(devices=[]):
        net = UNet(widths=recipe.widths, head=recipe.representation, feature_level=recipe.feature_level)
    _state_from_file(net, ckpt / _BEST)
    net.eval()
    threshold = float(curve["best_threshold"])
    test_f = [normalize_intensity(data.held_raw[i], rule) for i in data.test_idx]
    test_l = [data.held_labels[i] for i in data.test_idx]
    t0 = time.perf_counter()
    test = _scores(_predict(net, test_f), test_l, recipe.representation, threshold)
    val_idx = curve["validation_slices"]
    val = _scores(_predict(net, [normalize_intensity(data.held_raw[i], rule) for i in val_idx]),
                  [data.held_labels[i] for i in val_idx], recipe.representation, threshold)
    eval_s = time.perf_counter() - t0
    ref_tiles, tile = _reference_tiles(data, recipe)
    tr = TrainRecipe(**curve["train_recipe"])
    m = ds.manifest
    label_kind = ds.label_kind("train")
    card = {
        "data": (f"{ds.name}: split 'train' of {Path(data.manifest_path).name if data.manifest_path else 'manifest'}"
                 f", {len(data.train_raw)} slices "
                 f"{'x'.join(map(str, data.train_raw[0].shape))}, {label_kind} labels"),
        "dataset": {"name": ds.name, "manifest": Path(data.manifest_path).name if data.manifest_path else None,
                    "description": m.get("description"), "label_kind": label_kind,
                    "train_split": "train", "n_train_slices": len(data.train_raw),
                    "held_out_split": data.held_out, "validation_slices": val_idx, "test_slices": data.test_idx,
                    "n_held_out_slices": len(data.held_raw)},
        "n_samples": len(data.train_raw),
        "license": m.get("license"),
        "citation": m.get("citation"),
        "mode": "zoo source (trained from scratch on real labelled EM)",
        "recipe": tr.to_dict(),
        "zoo_recipe": recipe.to_dict(),
        "augmentation": describe_augmentation(tr),
        "intensity_rule": rule,
        "loss": "BCE on boundary targets from the instance labels (label 0 = membrane/boundary)",
        "early_stopping": {"metric": f"mean VI on the validation half (even slices) of split {data.held_out!r}, "
                                     f"best threshold of {list(recipe.thresholds)}",
                           "eval_every": recipe.eval_every, "patience": recipe.patience,
                           "min_delta": recipe.min_delta, "best_step": curve["best_step"],
                           "stopped_at": curve["points"][-1]["step"] if curve["points"] else None,
                           "stop_reason": curve["stop_reason"],
                           "extended_from": curve.get("extended", [])},
        "train_seconds": curve.get("seconds"),
        "command": _command(data.manifest_path, recipe),
        "built_by": "neuroadda_rt.zoo_builder.build_zoo_from_datasets",
        "notes": data.notes,
    }
    metrics = {
        "held_out": {"split": data.held_out, "slices": data.test_idx, "threshold": threshold,
                     "threshold_from": "the validation half (even slices), never the test half",
                     **{k: round(v, 5) for k, v in test.items() if k != "per_slice"},
                     "per_slice": test["per_slice"],
                     "metric_notes": "VI in bits (split + merge), adapted Rand error = 1 - F1 (CREMI); "
                                     "ground-truth 0 ignored; 2-D per slice, mean over slices"},
        "validation": {"split": data.held_out, "slices": val_idx, "threshold": threshold,
                       **{k: round(v, 5) for k, v in val.items() if k != "per_slice"},
                       "note": "used for early stopping and the threshold: optimistic as a test score"},
        "validation_curve": [{k: p[k] for k in ("step", "vi", "threshold", "train_loss")} for p in curve["points"]],
        "segmentation_threshold": threshold,
        "eval_seconds": round(eval_s, 2),
    }
    voxel = list(ds.voxel_size_nm) if ds.voxel_size_nm is not None else None
    pkg = save_model(net, out, name=ds.name, organism=ds.organism, tissue=ds.tissue, modality=ds.modality,
                     voxel_size_nm=voxel, normalization=rule, training=card, metrics=metrics,
                     reference_tiles=ref_tiles, pooling=recipe.pooling,
                     reference_info={"tile_size": tile, "seed": recipe.seed,
                                     "source": f"{recipe.reference_tiles} random tiles of the training slices"},
                     extra={"segmentation": {"threshold": threshold, "method": "neuroadda_rt.segment"},
                            "label_kind": label_kind, "synthetic": False,
                            "build_key": build_key},
                     overwrite=True)
    report(f"{ds.name}: package written to {out} (held-out VI {test['vi_total']:.3f}, adapted Rand "
           f"{test['adapted_rand_error']:.3f} on {len(data.test_idx)} test slices)")
    return pkg


def build_zoo_from_datasets(out_dir, manifests: Sequence, *, data_root=None,
                            recipe: DatasetZooRecipe | None = None, device: str = "cpu", progress: bool = False,
                            checkpoint_root=None, keep_checkpoints: bool = True, threads: int | None = None,
                            time_budget_s: float | None = None,
                            log_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train one model package per labelled data-set manifest and write them as a zoo.

    Parameters
    ----------
    out_dir : path
        The zoo folder (created). A package already there from the same recipe and data is kept.
    manifests : sequence of path or Dataset
        Dataset manifests (:class:`~neuroadda_rt.datasets.Dataset`), each with a labelled ``train``
        split and a labelled held-out split (``validation``, ``val`` or ``test``).
    data_root : path, optional
        Root of the manifests' relative paths (default ``$NEUROADDA_DATA``).
    recipe : DatasetZooRecipe, optional
        Network, training and early-stopping settings (default :data:`DEFAULT_DATASET_RECIPE`).
    device : {"cpu", "cuda", "auto"}
        Where to train.
    progress : bool
        Progress bars (stderr).
    checkpoint_root : path, optional
        Per-data-set checkpoints, curves and best weights (default ``<out_dir>/.checkpoints``).
    keep_checkpoints : bool
        Keep them after packaging (default True: a rerun then skips finished work at once).
    threads : int, optional
        PyTorch threads.
    time_budget_s : float, optional
        Wall-clock seconds of training per package (summed over resumed runs): training stops at the
        first evaluation past it, and the model card says so. The weights equal those of a run with
        ``max_steps`` set to that step (training is deterministic on the CPU).
    log_fn : callable(str), optional
        Receives one line per event (evaluations, packages); default: the module logger.

    Returns
    -------
    dict
        ``{"zoo": str, "models": {name: {"path", "held_out_vi", "held_out_adapted_rand", "best_step",
        "skipped"}}}``.

    Raises
    ------
    FormatError
        A manifest is unlabelled, has no labelled held-out split, or its labels hold no object.
    ShapeError
        A manifest's labels do not match its images.

    Examples
    --------
    >>> from neuroadda_rt.zoo_builder import build_zoo_from_datasets, DatasetZooRecipe    # doctest: +SKIP
    >>> build_zoo_from_datasets("my_zoo", ["examples/datasets/isbi2012.json"],            # doctest: +SKIP
    ...                         data_root="../shared/em_data", recipe=DatasetZooRecipe(max_steps=200))
    >>> neuroadda_rt.Zoo("my_zoo").names                                                 # doctest: +SKIP
    """
    torch = require("torch", "torch")
    recipe = recipe or DEFAULT_DATASET_RECIPE
    if not manifests:
        raise InputValueError("expected at least one dataset manifest, got none")
    report = log_fn or log.info
    if threads:
        torch.set_num_threads(int(threads))
    # every manifest is read and checked before any training: a bad one fails the build at once
    datas = [_load_data(m, data_root) for m in manifests]
    names = [d.dataset.name for d in datas]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputValueError(f"expected one manifest per data set name, got {dup} more than once")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckroot = Path(checkpoint_root) if checkpoint_root is not None else out / ".checkpoints"
    result: dict[str, Any] = {"zoo": str(out), "models": {}}
    for data in datas:
        name = data.dataset.name
        ck = ckroot / name
        curve = _train_one(data, recipe, ck, device=device, progress=progress, report=report,
                           time_budget_s=time_budget_s)
        dest = out / name
        _atomic.recover_dir(dest)
        existing = None
        if (dest / "model.json").is_file():
            try:
                existing = load_model(dest)
            except (FormatError, ValueError) as exc:
                report(f"{name}: the package in {dest} does not verify ({exc}); rewriting it")
        build_key = json_sha256({"training": curve["key"], "recipe": recipe.to_dict()})
        if existing is not None and (existing.metadata.get("extra") or {}).get("build_key") == build_key:
            report(f"{name}: package already built from this recipe and data; skipped")
            pkg, skipped = existing, True
        else:
            pkg, skipped = _package_one(data, recipe, curve, ck, dest, build_key=build_key, report=report), False
        ho = pkg.metrics.get("held_out") or {}
        result["models"][name] = {"path": str(pkg.path), "held_out_vi": ho.get("vi_total"),
                                  "held_out_adapted_rand": ho.get("adapted_rand_error"),
                                  "best_step": curve["best_step"], "skipped": skipped}
    if not keep_checkpoints and checkpoint_root is None:
        shutil.rmtree(ckroot, ignore_errors=True)
    return result


def zoo_card(zoo_dir) -> list[dict[str, Any]]:
    """One row per package of a zoo: name, organism, modality, voxel size, held-out VI and its command."""
    rows = []
    for p in Zoo(zoo_dir).paths:
        m = json.loads((p / "model.json").read_text(encoding="utf-8"))
        ho = (m.get("metrics") or {}).get("held_out") or {}
        rows.append({"name": m.get("name"), "organism": m.get("organism"), "modality": m.get("modality"),
                     "voxel_size_nm": m.get("voxel_size_nm"), "held_out_vi": ho.get("vi_total"),
                     "held_out_adapted_rand": ho.get("adapted_rand_error"),
                     "command": (m.get("training") or {}).get("command")})
    return rows
