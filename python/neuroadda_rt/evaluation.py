"""Evaluate a segmentation model on labelled images: VI split / merge / total and adapted Rand.

The model predicts probabilities for each whole image, :func:`neuroadda_rt.segment` turns them
into instances with the model's *own* threshold (tuned on its training tiles when it was
trained and stored in its ``model.json``; never tuned on the evaluation images), and the
instances are scored against the ground truth with :func:`neuroadda_rt.variation_of_information`
and :func:`neuroadda_rt.adapted_rand_error`.

Conventions: ``vi_split = H(segmentation | truth)`` (over-segmentation, false splits),
``vi_merge = H(truth | segmentation)`` (false merges), ``vi_total`` their sum, in bits
(log base 2); ``adapted_rand_error = 1 - F1`` of the Rand precision and recall (CREMI
definition, as scikit-image). "Overall" is the mean over images.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputValueError, ShapeError, require
from .metrics import adapted_rand_error, variation_of_information
from .package import ModelPackage, load_model as load_package
from .runtime import Predictor
from .segmentation import segment

log = logging.getLogger(__name__)

METRICS = ("vi_split", "vi_merge", "vi_total", "adapted_rand_error")


@dataclass
class Evaluation:
    """Per-image and overall segmentation scores of one model.

    Attributes
    ----------
    per_image : list of dict
        One dict per image: ``index``, ``vi_split``, ``vi_merge``, ``vi_total``,
        ``adapted_rand_error``, ``n_segments``, ``n_truth``.
    overall : dict
        The mean of each metric over the images.
    threshold : float
        The segmentation threshold used.
    model : str
        The model's name.
    threshold_source : str
        Where the threshold came from (``"argument"``, ``"model.json"``, ``"default"``).
    """

    per_image: list[dict[str, Any]]
    overall: dict[str, float]
    threshold: float
    model: str = ""
    threshold_source: str = ""
    representation: str = "boundary"
    segmentations: list[np.ndarray] | None = field(default=None, repr=False)

    @property
    def vi_total(self) -> float:
        return self.overall["vi_total"]

    @property
    def vi_split(self) -> float:
        return self.overall["vi_split"]

    @property
    def vi_merge(self) -> float:
        return self.overall["vi_merge"]

    @property
    def adapted_rand_error(self) -> float:
        return self.overall["adapted_rand_error"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: ``{"model", "threshold", "threshold_source", "representation",
        "overall": {...}, "per_image": [...]}``."""
        return {"model": self.model, "threshold": float(self.threshold), "threshold_source": self.threshold_source,
                "representation": self.representation, "n_images": len(self.per_image),
                "overall": {k: float(v) for k, v in self.overall.items()},
                "per_image": [dict(r) for r in self.per_image]}

    def to_frame(self):
        """A pandas DataFrame: one row per image plus a final ``"overall"`` row."""
        pd = require("pandas", "report")
        rows = [dict(r) for r in self.per_image]
        rows.append({"index": "overall", **self.overall})
        return pd.DataFrame(rows).set_index("index")

    def __repr__(self) -> str:
        o = self.overall
        return (f"Evaluation(model={self.model!r}, n={len(self.per_image)}, vi_total={o['vi_total']:.4f}, "
                f"vi_split={o['vi_split']:.4f}, vi_merge={o['vi_merge']:.4f}, "
                f"adapted_rand_error={o['adapted_rand_error']:.4f}, threshold={self.threshold:.3g})")


# --------------------------------------------------------------------------------------------
def _split_images(x, what: str) -> list[np.ndarray]:
    if isinstance(x, (list, tuple)):
        out = [np.asarray(v) for v in x]
    else:
        a = np.asarray(x)
        if a.ndim == 2:
            out = [a]
        elif a.ndim == 3:
            out = [a[i] for i in range(a.shape[0])]
        else:
            raise ShapeError(f"expected {what} as a 2-D image, an (N, H, W) stack or a list of 2-D images, "
                             f"got an array of shape {a.shape}")
    for v in out:
        if v.ndim != 2:
            raise ShapeError(f"expected every {what[:-1]} 2-D, got shape {v.shape}")
    return out


def score_segmentation(segmentation: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """VI split / merge / total and adapted Rand error of one segmentation against the truth.

    Both are integer label images of one shape (not copied). Pixels whose truth is 0
    (membrane / unlabelled) are left out, the default of
    :func:`~neuroadda_rt.variation_of_information` and :func:`~neuroadda_rt.adapted_rand_error`.

    Examples
    --------
    >>> gt = np.repeat([[1, 1, 2, 2]], 4, axis=0)
    >>> s = score_segmentation(gt.copy(), gt)
    >>> s["vi_total"], s["adapted_rand_error"]
    (0.0, 0.0)
    """
    seg, gt = np.asarray(segmentation), np.asarray(truth)
    if seg.shape != gt.shape:
        raise ShapeError(f"expected a segmentation of the truth's shape {gt.shape}, got {seg.shape}")
    split, merge = (float(v) for v in variation_of_information(seg, gt))
    are = float(adapted_rand_error(seg, gt)[0])
    return {"vi_split": split, "vi_merge": merge, "vi_total": split + merge, "adapted_rand_error": are}


def _model_info(model) -> tuple[str, str, dict]:
    """(name, representation, metadata) of a package, its folder, or a bare UNet (no metadata)."""
    if isinstance(model, (str, os.PathLike)):
        model = load_package(model)
    if isinstance(model, ModelPackage):
        return model.name, model.representation, model.metadata
    return type(model).__name__, str(model.config.get("head", "boundary")), {}


def stored_threshold(model) -> float | None:
    """The segmentation threshold recorded in a package's ``model.json`` (None if absent).

    Written at training time by :func:`~neuroadda_rt.finetune`, :func:`~neuroadda_rt.train_from_scratch`
    and ``neuroadda-rt zoo build`` under ``extra.segmentation.threshold`` (and
    ``metrics.segmentation_threshold``).
    """
    _, _, meta = _model_info(model)
    seg = (meta.get("extra") or {}).get("segmentation")
    if isinstance(seg, dict) and seg.get("threshold") is not None:
        return float(seg["threshold"])
    t = (meta.get("metrics") or {}).get("segmentation_threshold")
    return None if t is None else float(t)


def predict_probabilities(model, images, *, backend: str = "auto", device: str = "auto",
                          progress: bool = False) -> list[np.ndarray]:
    """Probabilities ``(C, H, W)`` float32 for each whole 2-D image (the package's normalisation applied).

    ``model`` is a model package (or its folder) or a bare UNet; images are raw (uint8/uint16)
    or float in [0, 1]. Inputs are not modified.
    """
    ims = _split_images(images, "images")
    pred = Predictor(model, backend=backend, device=device)
    out = []
    for im in ims:
        p = np.asarray(pred.predict(im), dtype=np.float32)
        if p.ndim == 2:
            p = p[None]
        out.append(p)
    return out


def evaluate(model, images, labels, *, threshold: float | None = None, backend: str = "auto",
             device: str = "auto", keep_segmentations: bool = False, progress: bool = False) -> Evaluation:
    """VI split, VI merge, VI total and adapted Rand error of a model, per image and overall.

    Parameters
    ----------
    model : ModelPackage, package folder, or UNet
        The model to score.
    images : (N, H, W) array or list of 2-D arrays
        Raw images (the model's input normalisation is applied) or floats in [0, 1]. Not modified.
    labels : (N, H, W) array or list of 2-D integer arrays
        Ground-truth instance labels, one per image. Not modified.
    threshold : float, optional
        Segmentation threshold. Default: the one stored in the package's ``model.json``
        (tuned on the model's own training tiles when it was trained); never tuned here,
        on the evaluation images.
    backend, device : str
        Passed to :class:`neuroadda_rt.Predictor`.
    keep_segmentations : bool
        Keep the instance segmentations on the result (``.segmentations``).

    Returns
    -------
    Evaluation
        ``.per_image``, ``.overall`` (mean over images), ``.to_dict()``, ``.to_frame()``.

    Examples
    --------
    >>> import neuroadda_rt as nr
    >>> zoo = nr.default_zoo()                                    # doctest: +SKIP
    >>> ev = nr.evaluate(next(iter(zoo)), images, labels)         # doctest: +SKIP
    >>> ev.overall["vi_total"]                                     # doctest: +SKIP
    """
    ims = _split_images(images, "images")
    lbs = _split_images(labels, "labels")
    if len(ims) == 0:
        raise InputValueError("expected at least one image to evaluate, got none")
    if len(ims) != len(lbs):
        raise ShapeError(f"expected one label image per image, got {len(lbs)} labels for {len(ims)} images")
    for k, (im, lb) in enumerate(zip(ims, lbs)):
        if im.shape != lb.shape:
            raise ShapeError(f"expected labels of the image's shape, got image {k} {im.shape} and labels {lb.shape}")
        if not np.issubdtype(lb.dtype, np.integer):
            raise InputValueError(f"expected integer instance labels, got dtype {lb.dtype} for labels {k}")
    model = load_package(model) if isinstance(model, (str, os.PathLike)) else model
    name, representation, _ = _model_info(model)
    source = "argument"
    if threshold is None:
        threshold = stored_threshold(model)
        source = "model.json"
        if threshold is None:
            source = "default"
            log.warning("model %r has no tuned segmentation threshold in its model.json; using segment()'s "
                        "default", name)
    probs = predict_probabilities(model, ims, backend=backend, device=device, progress=progress)
    rows, segs = [], []
    for k, (p, gt) in enumerate(zip(probs, lbs)):
        if representation == "boundary" and p.ndim == 3:
            p = p[0]
        seg = segment(p, representation) if threshold is None else segment(p, representation, threshold=threshold)
        seg = np.asarray(seg)
        s = score_segmentation(seg, gt)
        rows.append({"index": k, **s, "n_segments": int(len(np.unique(seg))), "n_truth": int(len(np.unique(gt)))})
        if keep_segmentations:
            segs.append(seg)
    overall = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
    used = float("nan") if threshold is None else float(threshold)
    return Evaluation(per_image=rows, overall=overall, threshold=used, model=name, threshold_source=source,
                      representation=representation, segmentations=segs if keep_segmentations else None)
