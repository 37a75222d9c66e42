"""Fine-tuning a source model on a few annotated tiles, and the from-scratch baseline.

Both entry points, :func:`finetune` and :func:`train_from_scratch`, run the *same* recipe
(the same steps, learning rate, batch size, patch size, augmentation and loss); they differ
only in where the weights start: the source package's trained weights, or a fresh
initialisation of the source's network config (drawn from ``torch.manual_seed(seed)``).
That is what makes "fine-tuned vs. scratch" a fair comparison (``docs/method.md``).

Determinism and resumption
--------------------------
Every random choice of a run (batch composition, crop positions, augmentation) is drawn
from one ``numpy.random.Generator`` seeded with ``seed``; weight initialisation from a
``torch`` generator seeded with ``seed``; PyTorch runs with deterministic algorithms.
On the CPU, two runs with the same inputs and seed on one machine (and thread count) give
bit-identical weights; across machines this is not promised (compare runs made on one). With
``checkpoint_dir`` the loop writes, every ``checkpoint_every`` steps, one atomic
checkpoint file (weights, BatchNorm statistics, optimizer state, step, loss history, the
state of both generators) as safetensors, with the small scalar parts as JSON in its
metadata: nothing is pickled. A later call with the same arguments and the same
``checkpoint_dir`` resumes from it and ends with the weights an uninterrupted run gives.
A call that differs only in a larger ``steps`` extends a finished run: with a constant learning
rate it ends with the weights of one uninterrupted run of the larger ``steps``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import _atomic
from . import labels as _labels
from ._digest import arrays_sha256, json_sha256
from .errors import BackendUnavailableError, DTypeError, FormatError, InputValueError, ShapeError, require
from .io import intensity_rule, normalize_intensity
from .models import unet_from_config
from .package import ModelPackage, load_model, save_model
from .runtime import Predictor
from .segmentation import tune_threshold
from .tiles import resize_tiles

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
_CHECKPOINT_FORMAT = "neuroadda_rt.checkpoint/1"


# --------------------------------------------------------------------------------------------
# recipe
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainRecipe:
    """The settings of one training run (identical for fine-tuning and scratch).

    Attributes
    ----------
    steps : int
        Optimizer steps (Adam).
    lr : float
        Adam learning rate, constant.
    batch_size : int
        Patches per step.
    patch_size : int
        Side of the square training patches, cropped at random from the training images
        (images smaller than this are used whole, reflect-padded to the patch size).
    augment : bool
        Random flips, 90-degree rotations, elastic deformation and intensity jitter.
    seed : int
        Seeds every random choice of the run.
    weight_decay : float
        Adam weight decay (L2).
    intensity : bool
        Include the intensity jitter in the augmentation (geometry is augmented either way
        when ``augment``). ``neuroadda-rt zoo build --no-intensity-augment`` trains sources
        without it (the bundled zoo's sources were trained with it).
    blur : float
        Largest Gaussian blur sigma (px) of the intensity augmentation; each patch is blurred
        with a sigma drawn uniformly from ``[0, blur]`` (0: no blur, the default).
    scale : float
        Largest relative scale change: each patch is cropped at ``patch_size * f`` and resized
        to ``patch_size`` (image bilinear, labels nearest), ``log f`` uniform in
        ``[-log(1 + scale), log(1 + scale)]`` (0: no rescaling, the default). Real EM volumes
        differ in pixel size; this teaches the encoder to tolerate small differences.

    Notes
    -----
    ``blur`` and ``scale`` draw random numbers only when non-zero, and :meth:`to_dict` leaves
    them out at 0, so recipes, checkpoints and bit-identical results of runs from before they
    existed are unchanged.
    """

    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 8
    patch_size: int = 128
    augment: bool = True
    seed: int = 0
    weight_decay: float = 0.0
    intensity: bool = True
    blur: float = 0.0
    scale: float = 0.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "patch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise InputValueError(f"expected {name} a positive integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and np.isfinite(self.lr) and self.lr > 0):
            raise InputValueError(f"expected lr a positive finite number, got {self.lr!r}")
        if not (np.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputValueError(f"expected weight_decay >= 0, got {self.weight_decay!r}")
        if self.patch_size < 8:
            raise InputValueError(f"expected patch_size >= 8, got {self.patch_size}")
        for name in ("blur", "scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and 0 <= v <= (5.0 if name == "blur" else 1.0)):
                raise InputValueError(f"expected {name} in [0, {5.0 if name == 'blur' else 1.0}], got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        # blur/scale at 0 are left out: the fingerprint of a run from before they existed stays the same
        return {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()
                if not (k in ("blur", "scale") and v == 0)}


@dataclass
class TrainHistory:
    """What a run recorded: the loss of every step and the time it took."""

    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_run: int = 0          # steps executed by this call (after a resume: fewer than ``steps``)
    resumed_from: int = 0       # step the run resumed from (0: fresh start)

    @property
    def steps_per_second(self) -> float:
        return self.steps_run / self.seconds if self.seconds > 0 else float("nan")

    def smoothed(self, window: int = 10) -> list[float]:
        """Running mean of the loss curve (for reports)."""
        if not self.loss:
            return []
        x = np.asarray(self.loss, dtype=np.float64)
        c = np.cumsum(np.insert(x, 0, 0.0))
        out = [(c[i + 1] - c[max(0, i + 1 - window)]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(x))]
        return [float(v) for v in out]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def describe_augmentation(recipe: TrainRecipe) -> str:
    """The augmentation of a recipe in words (for model cards)."""
    if not recipe.augment:
        return "none"
    parts = ["flips, 90-degree rotations, elastic"]
    if recipe.scale > 0:
        parts.append(f"scale x{1 / (1 + recipe.scale):.2f}..x{1 + recipe.scale:.2f}")
    if recipe.intensity and recipe.blur > 0:
        parts.append(f"Gaussian blur sigma 0..{recipe.blur:g} px")
    if recipe.intensity:
        parts.append("intensity jitter (contrast, brightness, gamma, Gaussian noise)")
    return ", ".join(parts)


def _split_pairs(images, labels) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate images and labels: a 2-D array, a (N, H, W) stack, or a sequence of 2-D arrays.

    Returns the images as given (raw dtype; normalising is the caller's one step) and the labels
    as contiguous integer arrays. Nothing is copied beyond that.
    """

    def split(x, what):
        if isinstance(x, (list, tuple)):
            out = [np.asarray(v) for v in x]
            for v in out:
                if v.ndim != 2:
                    raise ShapeError(f"expected every {what[:-1]} 2-D, got shape {v.shape}")
            return out
        if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
            a = np.asarray(x)
            if a.ndim == 2:
                return [a]
            if a.ndim == 3:
                return [a[i] for i in range(a.shape[0])]
            raise ShapeError(f"expected {what} as a 2-D image, an (N, H, W) stack or a list of 2-D images, "
                             f"got an array of shape {a.shape}")
        raise InputValueError(f"expected {what} as an array or a list of arrays, got {type(x).__name__}")

    ims, lbs = split(images, "images"), split(labels, "labels")
    if len(ims) == 0:
        raise InputValueError("expected at least one training image, got none")
    if len(ims) != len(lbs):
        raise ShapeError(f"expected as many label images as images, got {len(lbs)} labels for {len(ims)} images")
    for k, (im, lb) in enumerate(zip(ims, lbs)):
        if im.shape != lb.shape:
            raise ShapeError(f"expected labels of the image's shape, got image {k} {im.shape} and labels {lb.shape}")
        if min(im.shape) < 8:
            raise ShapeError(f"expected images at least 8x8, got image {k} of shape {im.shape}")
        if not np.issubdtype(lb.dtype, np.integer):
            raise DTypeError(f"expected integer instance labels, got dtype {lb.dtype} for labels {k}")
        if im.dtype.kind not in "uif":
            raise DTypeError(f"expected integer or float images, got dtype {im.dtype} for image {k}")
        if im.dtype.kind == "f" and not np.all(np.isfinite(im)):
            raise InputValueError(f"expected finite image values, got NaN/inf in image {k}")
    return ims, [np.ascontiguousarray(lb) for lb in lbs]


def _normalise_all(images: Sequence[np.ndarray], rule) -> list[np.ndarray]:
    """The one intensity step of a training run: :func:`neuroadda_rt.io.normalize_intensity`."""
    return [normalize_intensity(im, rule) for im in images]


# --------------------------------------------------------------------------------------------
# augmentation: one geometric transform applied to image and labels alike
# --------------------------------------------------------------------------------------------
@dataclass
class _Geometry:
    """A sampled geometric transform of a square patch: flips, a 90-degree rotation, and an
    optional elastic displacement field (``dy, dx`` in pixels, or None)."""

    flip_y: bool
    flip_x: bool
    rot90: int
    displacement: np.ndarray | None  # (2, S, S) float64

    def coordinates(self, size: int) -> np.ndarray:
        """Source coordinates (2, S, S): output pixel (i, j) reads input at ``coords[:, i, j]``."""
        yy, xx = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
        if self.displacement is not None:
            yy = yy + self.displacement[0]
            xx = xx + self.displacement[1]
        # the rigid part: rotate then flip the coordinate grid (a permutation of pixel indices)
        c = np.stack([yy, xx])
        c = np.rot90(c, self.rot90, axes=(1, 2))
        if self.flip_y:
            c = c[:, ::-1, :]
        if self.flip_x:
            c = c[:, :, ::-1]
        return np.ascontiguousarray(c)


def _sample_geometry(rng: np.random.Generator, size: int, *, elastic: bool = True,
                     alpha: float = 4.0, grid: int = 4) -> _Geometry:
    """Draw a transform. Elastic: Gaussian displacements (std ``alpha`` px) on a coarse
    ``grid x grid`` lattice, upsampled smoothly (cubic) to the patch."""
    flip_y, flip_x = bool(rng.integers(2)), bool(rng.integers(2))
    rot = int(rng.integers(4))
    disp = None
    if elastic:
        coarse = rng.normal(0.0, alpha, size=(2, grid, grid))
        m = _upsampling_matrix(size, grid)
        disp = np.stack([m @ coarse[i] @ m.T for i in range(2)])
    return _Geometry(flip_y, flip_x, rot, disp)


@functools.lru_cache(maxsize=16)
def _upsampling_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) matrix of cubic-spline upsampling: ``M @ c @ M.T`` equals
    ``scipy.ndimage.zoom(c, size / grid, order=3, mode="nearest")`` (the spline is separable),
    at a fraction of its cost per patch."""
    from scipy import ndimage

    eye = np.eye(grid)
    m = np.stack([ndimage.zoom(eye[g], size / grid, order=3, mode="nearest")[:size] for g in range(grid)], axis=1)
    m.setflags(write=False)
    return m


def _apply_geometry(image: np.ndarray, labels: np.ndarray, geom: _Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Warp a square image (bilinear) and its labels (nearest) with the same transform.

    Coordinates outside the patch are reflected back in (``mode="mirror"``), so no padding
    value leaks into either output.
    """
    from scipy import ndimage

    size = image.shape[0]
    if geom.displacement is None:
        # pure permutation of pixel indices: no interpolation at all
        def rigid(a):
            a = np.rot90(a, geom.rot90)
            if geom.flip_y:
                a = a[::-1, :]
            if geom.flip_x:
                a = a[:, ::-1]
            return np.ascontiguousarray(a)

        return rigid(image), rigid(labels)
    c = geom.coordinates(size)
    img = ndimage.map_coordinates(image, c, order=1, mode="mirror").astype(np.float32, copy=False)
    # nearest neighbour for ids: round the same coordinates, reflect into range like "mirror"
    ci = np.rint(c).astype(np.int64)
    ci = _mirror_index(ci, size)
    lab = labels[ci[0], ci[1]]
    return img, lab


def _mirror_index(i: np.ndarray, n: int) -> np.ndarray:
    """Reflect integer indices into [0, n) as scipy's ``mode="mirror"`` does (d c b | a b c d | c b a)."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i >= n, period - i, i)


def _jitter_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast, brightness and gamma jitter plus mild Gaussian noise, clipped to [0, 1]."""
    contrast = float(np.exp(rng.uniform(-0.25, 0.25)))
    brightness = float(rng.uniform(-0.1, 0.1))
    gamma = float(np.exp(rng.uniform(-0.3, 0.3)))
    noise = float(rng.uniform(0.0, 0.03))
    out = (image - 0.5) * contrast + 0.5 + brightness
    out = np.clip(out, 0.0, 1.0) ** gamma
    if noise > 0:
        out = out + rng.normal(0.0, noise, size=image.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def augment_pair(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
                 elastic: bool = True, intensity: bool = True, blur: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Augment one square patch and its instance labels identically.

    Parameters
    ----------
    image : (S, S) float array
        Patch intensities in [0, 1]. Not modified.
    labels : (S, S) integer array
        Instance ids. Not modified.
    rng : numpy.random.Generator
        Source of every random choice (so a seed fixes the result).
    elastic, intensity : bool
        Switch the elastic deformation and the intensity jitter.
    blur : float
        With ``intensity``: blur the image with a Gaussian of sigma uniform in ``[0, blur]`` px
        before the jitter (its noise is added after the blur, as a detector's would be).

    Returns
    -------
    image, labels : new arrays
        Flipped, rotated by a multiple of 90 degrees, optionally elastically deformed (the
        image bilinearly, the labels by nearest neighbour on the same coordinates) and, for the
        image only, intensity-jittered.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> im, lb = np.random.rand(32, 32).astype(np.float32), np.arange(1024).reshape(32, 32)
    >>> a, b = augment_pair(im, lb, rng, elastic=False, intensity=False)
    >>> bool(np.all(a == im.ravel()[b]))
    True
    """
    if image.ndim != 2 or image.shape[0] != image.shape[1] or labels.shape != image.shape:
        raise ShapeError(f"expected a square 2-D patch and labels of the same shape, got {image.shape} "
                         f"and {labels.shape}")
    geom = _sample_geometry(rng, image.shape[0], elastic=elastic)
    img, lab = _apply_geometry(image, labels, geom)
    if intensity and blur > 0:
        from scipy import ndimage

        sigma = float(rng.uniform(0.0, blur))
        if sigma > 0.25:  # below a quarter pixel a Gaussian changes nothing visible
            img = ndimage.gaussian_filter(np.asarray(img, dtype=np.float32), sigma, mode="mirror")
    if intensity:
        img = _jitter_intensity(img, rng)
    return img, lab


def _resize_pair(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A square crop and its labels resized to ``size`` (image bilinear without a pre-filter, as
    :func:`~neuroadda_rt.tiles.resize_tiles`; labels nearest; pixel centres aligned), for the scale
    augmentation."""
    c = image.shape[0]
    idx = np.clip(np.floor((np.arange(size) + 0.5) * (c / size)).astype(np.int64), 0, c - 1)
    return resize_tiles(image, size, anti_alias=False), labels[np.ix_(idx, idx)]


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------
def make_targets(labels: np.ndarray, representation: str) -> tuple[np.ndarray, np.ndarray]:
    """Training targets and a loss mask from instance labels.

    Returns ``(target, mask)``, both float32 of shape ``(C, H, W)`` (C = 1 for boundaries,
    2 for 2-D affinities). The conversions are :func:`neuroadda_rt.labels.instances_to_boundary`
    (label 0 counts as boundary) and :func:`neuroadda_rt.labels.instances_to_affinities`; the
    mask is 1 everywhere (every pixel is supervised).
    """
    if representation == "boundary":
        # label 0 (membranes, extracellular space) is boundary, as in the synthetic and real sets
        t = np.asarray(_labels.instances_to_boundary(labels, zero_is_boundary=True), dtype=np.float32)[None]
    elif representation == "affinities":
        t = np.asarray(_labels.instances_to_affinities(labels), dtype=np.float32)
    else:
        raise InputValueError(f"expected representation 'boundary' or 'affinities', got {representation!r}")
    return t, np.ones_like(t)


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
def _crop(a: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    out = a[y:y + size, x:x + size]
    if out.shape != (size, size):  # image smaller than the patch: reflect-pad it up
        py, px = size - out.shape[0], size - out.shape[1]
        out = np.pad(out, ((0, py), (0, px)), mode="symmetric")
    return out


def _make_batch(images, labels, rng: np.random.Generator, recipe: TrainRecipe, representation: str,
                target_fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = recipe.patch_size
    xs, ts, ms = [], [], []
    for _ in range(recipe.batch_size):
        k = int(rng.integers(len(images)))
        im, lb = images[k], labels[k]
        c = s
        if recipe.augment and recipe.scale > 0:  # small scale change: crop larger or smaller, resize to s
            f = float(np.exp(rng.uniform(-np.log1p(recipe.scale), np.log1p(recipe.scale))))
            c = max(8, min(int(round(s * f)), *im.shape))
        y = int(rng.integers(max(1, im.shape[0] - c + 1)))
        x = int(rng.integers(max(1, im.shape[1] - c + 1)))
        pi, pl = _crop(im, y, x, c), _crop(lb, y, x, c)
        if c != s:
            pi, pl = _resize_pair(pi, pl, s)
        if recipe.augment:
            pi, pl = augment_pair(pi, pl, rng, intensity=recipe.intensity, blur=recipe.blur)
        t, m = target_fn(pl, representation)
        xs.append(pi[None])
        ts.append(t)
        ms.append(m)
    return (np.stack(xs).astype(np.float32), np.stack(ts).astype(np.float32), np.stack(ms).astype(np.float32))


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def _save_checkpoint(path: Path, net, opt, step: int, history: list[float], rng: np.random.Generator,
                     torch_gen, fingerprint: str) -> None:
    """Write one checkpoint file atomically (temp file in the same folder, then rename)."""
    torch = require("torch", "torch")
    save_file = require("safetensors.torch", "runtime").save_file
    tensors: dict[str, Any] = {}
    for k, v in net.state_dict().items():
        tensors[f"model/{k}"] = v.detach().cpu().clone().contiguous()
    opt_state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt_state["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim/{pid}/{key}"] = val.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    tensors["rng/torch"] = torch_gen.get_state().clone()
    meta = {
        "format": _CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "step": step,
        "loss": history,
        "numpy_rng": rng.bit_generator.state,
        "param_groups": opt_state["param_groups"],
        "optim_scalars": scalars,
    }
    with _atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"neuroadda_rt": json.dumps(meta)})


def _load_checkpoint(path: Path, net, opt, rng: np.random.Generator, torch_gen, fingerprint: str
                     ) -> tuple[int, list[float]]:
    safe_open = require("safetensors", "runtime").safe_open
    load_file = require("safetensors.torch", "runtime").load_file
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("neuroadda_rt", "{}"))
        tensors = load_file(str(path))
    except Exception as exc:  # truncated or foreign file
        raise FormatError(f"cannot read training checkpoint {path}: {exc}") from exc
    if meta.get("format") != _CHECKPOINT_FORMAT:
        raise FormatError(f"expected a {_CHECKPOINT_FORMAT} checkpoint in {path}, got format {meta.get('format')!r}")
    if meta.get("fingerprint") != fingerprint:
        raise InputValueError(
            f"checkpoint {path} belongs to a different run (other model, data or settings); "
            "use another checkpoint_dir or delete the file to start over")
    net.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, key = k.split("/", 2)
            state.setdefault(int(pid), {})[key] = v
    for pid, st in meta.get("optim_scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng.bit_generator.state = meta["numpy_rng"]
    torch_gen.set_state(tensors["rng/torch"])
    return int(meta["step"]), [float(v) for v in meta["loss"]]


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _deterministic_torch(device: str = "cpu"):
    """Deterministic algorithms for the duration of a run; the caller's setting is restored.

    On CUDA an op without a deterministic kernel only warns (GPU runs are reproducible up to
    such ops; the bit-for-bit promise is for the CPU)."""
    torch = require("torch", "torch")
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device == "cuda")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _torch_device(device: str) -> str:
    """Where PyTorch trains: what PyTorch itself can reach (not the C++ kernels' build)."""
    torch = require("torch", "torch")
    if device not in ("auto", "cpu", "cuda"):
        raise InputValueError(f"expected device 'auto', 'cpu' or 'cuda', got {device!r}")
    has_cuda = bool(torch.cuda.is_available())
    if device == "cuda" and not has_cuda:
        raise BackendUnavailableError("device='cuda' was asked for but this PyTorch sees no CUDA device "
                                      f"(torch {torch.__version__}); use device='cpu'")
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
        log.info("training on %s (device='auto')", device)
    return device


def _state_digest(net) -> str:
    state = sorted(net.state_dict().items())
    return arrays_sha256(*(v.detach().cpu().numpy() for _, v in state), header=[k for k, _ in state])


def train_network(net, images, labels, *, recipe: TrainRecipe | None = None, representation: str | None = None,
                  checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 50,
                  progress: bool = False, device: str = "cpu", callback: Callable[[int, float], None] | None = None,
                  target_fn=None, desc: str = "training") -> TrainHistory:
    """Train a :class:`~neuroadda_rt.models.UNet` in place with BCE on targets from instance labels.

    The engine under :func:`finetune` and :func:`train_from_scratch`; use those unless you
    hold a bare network.

    Parameters
    ----------
    net : UNet
        Trained in place (left in eval mode at the end).
    images, labels : array or list of 2-D arrays
        Training images and their instance labels. Images are brought to [0, 1] once, by
        :func:`neuroadda_rt.io.normalize_intensity` with the ``"dtype"`` rule (integer images
        scaled by their dtype's range, floats taken as already in [0, 1]). Read, never modified.
    recipe : TrainRecipe
        Steps, learning rate, batch size, patch size, augmentation, seed.
    representation : {"boundary", "affinities"}, optional
        The network's head (default: from ``net.config``).
    checkpoint_dir : path, optional
        Where to keep the resumable checkpoint; a matching checkpoint there is resumed (a checkpoint of
        the same run with fewer ``steps`` is extended; one past ``recipe.steps`` is refused).
    checkpoint_every : int
        Steps between checkpoints (the last step is always saved).
    progress : bool
        tqdm bar with the loss, steps/s and the ETA.
    device : {"cpu", "cuda", "auto"}
        Where to train. Bit-for-bit determinism is promised on the CPU only.
    callback : callable(step, loss), optional
        Called after every completed step (step counts from 1).
    target_fn : callable(labels, representation) -> (target, mask), optional
        Override of :func:`make_targets` (tests).

    Returns
    -------
    TrainHistory
        The loss of every step since step 0 (including the steps of a resumed-from run).

    Examples
    --------
    >>> from neuroadda_rt.models import UNet
    >>> net = UNet(widths=(4, 8))
    >>> lab = np.repeat(np.arange(4), 16)[None, :].repeat(64, 0)
    >>> img = (lab % 2).astype(np.float32)
    >>> h = train_network(net, img, lab, recipe=TrainRecipe(steps=2, batch_size=2, patch_size=32))
    >>> len(h.loss)
    2
    """
    raw, lbs = _split_pairs(images, labels)
    return _train(net, _normalise_all(raw, "dtype"), lbs, recipe=recipe or TrainRecipe(),
                  representation=representation, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                  progress=progress, device=device, callback=callback, target_fn=target_fn, desc=desc)


def _train(net, ims: list[np.ndarray], lbs: list[np.ndarray], *, recipe: TrainRecipe, representation: str | None,
           checkpoint_dir, checkpoint_every: int, progress: bool, device: str, callback, target_fn,
           desc: str) -> TrainHistory:
    """The loop of :func:`train_network` on validated, already normalised float images."""
    torch = require("torch", "torch")

    if not isinstance(checkpoint_every, (int, np.integer)) or checkpoint_every < 1:
        raise InputValueError(f"expected checkpoint_every a positive integer, got {checkpoint_every!r}")
    representation = representation or net.config.get("head", "boundary")
    target_fn = target_fn or make_targets
    dev = _torch_device(device)
    net.to(dev)

    # ``steps`` only bounds the loop: the learning rate is constant and batches are drawn in order, so the
    # state after step k is the same for every bound >= k, and a longer run may extend a shorter one's checkpoint
    fingerprint = json_sha256({
        "recipe": {k: v for k, v in recipe.to_dict().items() if k != "steps"}, "representation": representation,
        "config": net.config,
        "data": arrays_sha256(*(a for pair in zip(ims, lbs) for a in pair)), "init": _state_digest(net),
    })

    rng = np.random.default_rng(recipe.seed)
    torch_gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    start, losses = 0, []
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists():
        start, losses = _load_checkpoint(ckpt, net, opt, rng, torch_gen, fingerprint)
        if start > recipe.steps:
            raise InputValueError(
                f"checkpoint {ckpt} is at step {start}, past this run's steps={recipe.steps}; ask for at least "
                f"{start} steps, or use another checkpoint_dir")
        log.info("resuming %s from step %d of %d (%s)", desc, start, recipe.steps, ckpt)
    history = TrainHistory(loss=list(losses), resumed_from=start)

    bar = None
    if progress and start < recipe.steps:
        tqdm = require("tqdm", "runtime").tqdm
        bar = tqdm(total=recipe.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        with _deterministic_torch(dev):
            net.train()
            for step in range(start, recipe.steps):
                x, t, m = _make_batch(ims, lbs, rng, recipe, representation, target_fn)
                xt = torch.from_numpy(x).to(dev)
                tt = torch.from_numpy(t).to(dev)
                mt = torch.from_numpy(m).to(dev)
                logits = net.logits(xt)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, tt, weight=mt, reduction="sum")
                loss = loss / mt.sum().clamp_min(1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = float(loss.detach())
                if not np.isfinite(value):
                    raise InputValueError(f"training diverged at step {step + 1} (loss {value}); lower lr")
                history.loss.append(value)
                history.steps_run += 1
                done = step + 1
                if ckpt is not None and (done % checkpoint_every == 0 or done == recipe.steps):
                    _save_checkpoint(ckpt, net, opt, done, history.loss, rng, torch_gen, fingerprint)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                if callback is not None:
                    callback(done, value)
    finally:
        history.seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        net.eval()
    return history


# --------------------------------------------------------------------------------------------
# model packages in, model packages out
# --------------------------------------------------------------------------------------------
#: The recipe of ``finetune`` and ``train_from_scratch`` (see docs/method.md, "Training").
DEFAULT_RECIPE = TrainRecipe(steps=200, lr=3e-4, batch_size=8, patch_size=128, augment=True, seed=0)

#: Weight of the fine-tuned network in what :func:`finetune` returns (the rest is the source's): the midpoint of
#: WiSE-FT (Wortsman et al. 2022). On the four real EM targets (``docs/results.md`` §5.9) it lowered the top-ranked
#: source's held-out VI by 0.075 against plain fine-tuning (p 3e-5) and lost on no target beyond the seed spread.
DEFAULT_FINETUNE_MIX = 0.5


def interpolate_weights(source_state: dict, finetuned_state: dict, mix: float) -> dict:
    """Weights between a source network and its fine-tuned copy (WiSE-FT).

    Parameters
    ----------
    source_state, finetuned_state : dict
        ``state_dict()`` of the same architecture (same keys and shapes).
    mix : float
        Weight of the fine-tuned network, in (0, 1]: every floating-point tensor (weights, biases,
        BatchNorm running statistics) becomes ``(1 - mix) * source + mix * finetuned``; integer
        tensors (BatchNorm's batch counter) are the fine-tuned network's.

    Returns
    -------
    dict
        A new state dict.
    """
    if set(source_state) != set(finetuned_state):
        raise InputValueError(f"expected two state dicts of one architecture, got keys differing in "
                              f"{sorted(set(source_state) ^ set(finetuned_state))[:5]}")
    out = {}
    for k, v in finetuned_state.items():
        if tuple(source_state[k].shape) != tuple(v.shape):
            raise ShapeError(f"expected {k} of one shape in both networks, got {tuple(source_state[k].shape)} "
                             f"and {tuple(v.shape)}")
        out[k] = (1 - mix) * source_state[k].to(v.dtype) + mix * v if v.is_floating_point() else v.clone()
    return out


def _check_mix(mix) -> float:
    if isinstance(mix, bool) or not isinstance(mix, (int, float, np.floating)) or not (0 < float(mix) <= 1):
        raise InputValueError(f"expected mix a number in (0, 1] (1: plain fine-tuning), got {mix!r}")
    return float(mix)


def _as_package(model) -> ModelPackage:
    """A loaded ModelPackage from a package or a package folder."""
    if isinstance(model, ModelPackage):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise InputValueError(f"expected a ModelPackage or a model package folder, got {type(model).__name__}")


def _reference_tiles(images: Sequence[np.ndarray], size: int, *, max_tiles: int = 64, seed: int = 0) -> np.ndarray:
    """Tiles of ``size`` covering the training images (half-overlapping grid, at most ``max_tiles``,
    a seeded subset when there are more): the sample the new ``reference_features`` come from."""
    tiles = []
    for im in images:
        h, w = im.shape
        s = min(size, h, w)
        ys = sorted(set(list(range(0, h - s + 1, max(1, s // 2))) + [h - s]))
        xs = sorted(set(list(range(0, w - s + 1, max(1, s // 2))) + [w - s]))
        tiles += [(im, y, x, s) for y in ys for x in xs]
    s_min = min(t[3] for t in tiles)
    if len(tiles) > max_tiles:
        pick = np.sort(np.random.default_rng(seed).choice(len(tiles), max_tiles, replace=False))
        tiles = [tiles[i] for i in pick]
    return np.stack([im[y:y + s_min, x:x + s_min] for im, y, x, _ in tiles])


def _tune_threshold(net, images_f: Sequence[np.ndarray], labels: Sequence[np.ndarray], representation: str
                    ) -> dict[str, Any]:
    """Segmentation threshold minimising VI on normalised (un-augmented) training images."""
    # the images are normalised already: the predictor must not apply a rule a second time
    pred = Predictor(net, backend="torch", device="cpu", normalize=False)
    probs = []
    for im in images_f:
        p = pred.predict(im)
        probs.append(p[0] if representation == "boundary" else p)
    res = tune_threshold(probs, [np.asarray(lb) for lb in labels], representation)
    return {"threshold": float(res.threshold), "vi_train": float(res.vi) / max(1, len(probs)),
            "tuned_on": f"{len(probs)} training images (un-augmented), VI with ground-truth 0 ignored",
            "method": "neuroadda_rt.tune_threshold over 0.05..0.95",
            "scores": {f"{k:g}": float(v) for k, v in res.scores.items()}}


def _history_dict(history: TrainHistory, recipe: TrainRecipe, loss_every: int = 1) -> dict[str, Any]:
    loss = np.asarray(history.loss, dtype=np.float64)
    out = {"loss": [round(float(loss[i:i + loss_every].mean()), 6) for i in range(0, len(loss), loss_every)],
           "steps": len(history.loss), "seconds": round(history.seconds, 3),
           "steps_per_second": round(history.steps_per_second, 3) if history.steps_run else None,
           "resumed_from": history.resumed_from,
           "final_loss": float(np.mean(history.loss[-10:])) if history.loss else None, "recipe": recipe.to_dict()}
    if loss_every > 1:
        out["loss_every"] = loss_every  # running mean over blocks of this many steps
    return out


def train_and_package(net, images, labels, *, recipe: TrainRecipe, out, name: str,
                      normalization: dict | str | None = None, organism: str | None = None,
                      tissue: str | None = None, modality: str | None = None, voxel_size_nm=None,
                      pooling: str = "mean", training: dict | None = None, metrics: dict | None = None,
                      extra: dict | None = None, reference_tiles=None, reference_tile_size: int = 256,
                      reference_info: dict | None = None, threshold_images=None, threshold_labels=None,
                      loss_every: int = 1, checkpoint_dir=None, checkpoint_every: int = 50, progress: bool = False,
                      device: str = "cpu", callback: Callable[[int, float], None] | None = None,
                      desc: str = "training", overwrite: bool = False, interpolate_from: dict | None = None,
                      mix: float = 1.0) -> ModelPackage:
    """Train a network and write it as a model package: the one train-then-package path.

    :func:`finetune`, :func:`train_from_scratch`, the zoo builder and the study runner all
    end here, so every trained model is an ordinary package (usable in a :class:`~neuroadda_rt.Zoo`).

    Parameters
    ----------
    net : UNet
        The network to train (in place), initialised by the caller: a source's weights
        (fine-tuning) or a seeded fresh initialisation.
    images, labels : array or list of 2-D arrays
        Raw training images (any numeric dtype) and their instance labels. Read, never modified.
    recipe : TrainRecipe
        The run's settings; ``patch_size`` is clipped to the smallest image.
    out : path
        The package folder to write.
    name : str
        Package name.
    normalization : dict or str, optional
        The intensity rule (:func:`neuroadda_rt.io.intensity_rule`; default ``"dtype"``): applied
        once to the training, threshold and reference images, and stored in the package.
    organism, tissue, modality, voxel_size_nm, pooling
        Package metadata (:func:`neuroadda_rt.save_model`).
    training : dict, optional
        Training provenance; merged over the defaults (data, n_samples, recipe, loss, augmentation).
    metrics, extra : dict, optional
        Merged over the recorded metrics (loss curve, threshold) and ``extra`` (``segmentation``).
    reference_tiles : array, optional
        Raw tiles for the package's reference features (default: a half-overlapping grid of
        ``reference_tile_size`` tiles over the training images, at most 64, seeded by ``recipe.seed``).
    reference_tile_size : int
        Tile side of the default reference tiles.
    reference_info : dict, optional
        How the reference tiles were drawn (recorded with the features).
    threshold_images, threshold_labels : array or list of 2-D arrays, optional
        Raw images and labels the segmentation threshold is tuned on (default: the training images).
    loss_every : int
        Store the loss curve in ``metrics.training`` as running means of this many steps.
    checkpoint_dir, checkpoint_every, progress, device, callback, desc
        As in :func:`train_network` (resumable; a finished checkpoint makes this call train no step).
    overwrite : bool
        Replace an existing package at ``out``.
    interpolate_from : dict, optional
        A ``state_dict`` of the network before training: the trained weights are then replaced by
        :func:`interpolate_weights` (``mix``) before the threshold and reference features are computed.
    mix : float
        Weight of the trained network when ``interpolate_from`` is given.

    Returns
    -------
    ModelPackage
        The written package, with the run's :class:`TrainHistory` as ``.history``.
    """
    raw, lbs = _split_pairs(images, labels)
    rule = intensity_rule(normalization or "dtype")
    ims = _normalise_all(raw, rule)
    patch = min(recipe.patch_size, *(min(im.shape) for im in ims))
    if patch != recipe.patch_size:
        log.info("patch_size %d > smallest training image: using %d", recipe.patch_size, patch)
        recipe = TrainRecipe(**{**recipe.to_dict(), "patch_size": int(patch)})
    history = _train(net, ims, lbs, recipe=recipe, representation=None, checkpoint_dir=checkpoint_dir,
                     checkpoint_every=checkpoint_every, progress=progress, device=device, callback=callback,
                     target_fn=None, desc=desc)
    net = net.cpu().eval()
    if interpolate_from is not None and mix != 1.0:
        net.load_state_dict(interpolate_weights(interpolate_from, net.state_dict(), _check_mix(mix)))
        training = {**(training or {}), "weight_interpolation": {
            "mix": float(mix), "method": "WiSE-FT: (1 - mix) * initial + mix * trained weights, every float tensor"}}
    representation = net.config["head"]
    if threshold_images is None:
        seg = _tune_threshold(net, ims, lbs, representation)
    else:
        th_raw, th_lbs = _split_pairs(threshold_images, threshold_labels)
        seg = _tune_threshold(net, _normalise_all(th_raw, rule), th_lbs, representation)
    if reference_tiles is None:
        reference_tiles = _reference_tiles(raw, reference_tile_size, seed=recipe.seed)
        reference_info = {"tile_size": int(reference_tiles.shape[-1]), "seed": recipe.seed,
                          "source": "the training tiles (half-overlapping grid)", **(reference_info or {})}
    shapes = ", ".join(sorted({"x".join(map(str, im.shape)) for im in ims}))
    provenance = {"data": f"{len(ims)} annotated tiles ({shapes})", "n_samples": len(ims),
                  "recipe": recipe.to_dict(), "loss": "BCE on boundary/affinity targets from the instance labels",
                  "augmentation": describe_augmentation(recipe),
                  **(training or {})}
    recorded = {"training": _history_dict(history, recipe, loss_every), "segmentation_threshold": seg["threshold"],
                "vi_train": seg["vi_train"], **(metrics or {})}
    pkg = save_model(net, out, name=name, organism=organism, tissue=tissue, modality=modality,
                     voxel_size_nm=voxel_size_nm, normalization=rule, training=provenance, metrics=recorded,
                     reference_tiles=reference_tiles, pooling=pooling, reference_info=reference_info,
                     extra={**(extra or {}), "segmentation": seg}, overwrite=overwrite)
    pkg.history = history  # the in-memory result also carries the loss curve
    return pkg


_DATA_KEYS = ("organism", "tissue", "modality", "voxel_size_nm")


def _train_package(source, images, labels, *, mode: str, recipe: TrainRecipe, out, name: str | None,
                   data: dict | None = None, **run) -> ModelPackage:
    """:func:`finetune` / :func:`train_from_scratch`: a source package's network, metadata and rule."""
    torch = require("torch", "torch")

    pkg = _as_package(source)
    if mode == "finetune":
        net = pkg.unet()
        if run.get("mix", 1.0) != 1.0:
            run["interpolate_from"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    else:
        # a fresh initialisation of the source's architecture, drawn from the seed without
        # touching the caller's global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            net = unet_from_config(pkg.config)
    label = "finetuned" if mode == "finetune" else "scratch"
    name = name or f"{pkg.name}-{label}"
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="neuroadda-trained-")) / name
    data = dict(data or {})
    unknown = set(data) - set(_DATA_KEYS)
    if unknown:
        raise InputValueError(f"expected data keys among {_DATA_KEYS}, got {sorted(unknown)}")
    # The new package describes the annotated tiles it learnt from, not the source: a fine-tuned model kept the
    # source's organism and voxel size, so a ranking of it against the next volume read the wrong domain.
    # What the caller does not say is recorded as unknown; the source's own description moves under training.
    training = {"mode": mode, "source_model": {"name": pkg.name, "sha256": pkg.sha256,
                                               **{k: getattr(pkg, k) for k in _DATA_KEYS}},
                "initialisation": ("the source model's weights" if mode == "finetune"
                                   else f"fresh (torch.manual_seed({recipe.seed})), the source's network config")}
    ref_size = int((pkg.metadata.get("reference_features") or {}).get("tile_size") or 256)
    return train_and_package(net, images, labels, recipe=recipe, out=out, name=name,
                             normalization=pkg.normalization, organism=data.get("organism"),
                             tissue=data.get("tissue"), modality=data.get("modality"),
                             voxel_size_nm=data.get("voxel_size_nm"), pooling=pkg.pooling,
                             training=training, extra=dict(pkg.metadata.get("extra") or {}),
                             reference_tile_size=ref_size, desc=f"{'fine-tuning' if mode == 'finetune' else 'scratch'} {pkg.name}",
                             **run)


_TRAIN_DOC = """
    Parameters
    ----------
    model : ModelPackage or path
        The source model package (its folder, or a loaded package).
    images : (N, H, W) array or list of 2-D arrays
        The annotated tiles, raw (the package's intensity rule is applied) -- e.g.
        ``select_tiles(...).tiles``. Read, never modified.
    labels : (N, H, W) integer array or list of 2-D arrays
        Their instance labels (0 = membrane / unlabelled, counted as boundary).
    steps, lr, batch_size, patch_size, augment, seed
        The recipe (:class:`TrainRecipe`); defaults :data:`DEFAULT_RECIPE`, the same for
        fine-tuning and scratch.
    checkpoint_dir : path, optional
        Keep a resumable checkpoint here; a call with the same arguments resumes from it.
    checkpoint_every : int
        Steps between checkpoints.
    progress : bool
        tqdm progress bar (loss, steps/s, ETA).
    device : {"cpu", "cuda", "auto"}
        Where to train (bit-for-bit determinism on one CPU machine).
    out : path, optional
        Where to write the new package (default: a new temporary folder; ``.save(path)`` it).
    name : str, optional
        Package name (default ``"<source>-finetuned"`` / ``"<source>-scratch"``).
    callback : callable(step, loss), optional
        Called after every step.
    data : dict, optional
        What the annotated tiles are: ``organism``, ``tissue``, ``modality``, ``voxel_size_nm``. The new
        package's metadata describes them (unknown where not given); the source's description is kept
        under ``training.source_model``.
    overwrite : bool
        Replace an existing package at ``out``.

    Returns
    -------
    ModelPackage
        Weights, ONNX exports, ``reference_features`` recomputed on the training tiles, the
        segmentation threshold tuned on the training tiles (``model.json`` ``extra.segmentation``
        and ``metrics.segmentation_threshold``), and the loss curve (``metrics.training``;
        also ``.history`` on the returned object).
"""


def finetune(model, images, labels, *, steps: int = DEFAULT_RECIPE.steps, lr: float = DEFAULT_RECIPE.lr,
             batch_size: int = DEFAULT_RECIPE.batch_size, patch_size: int = DEFAULT_RECIPE.patch_size,
             augment: bool = True, seed: int = 0, checkpoint_dir=None, checkpoint_every: int = 50,
             progress: bool = False, device: str = "cpu", out=None, name: str | None = None,
             callback: Callable[[int, float], None] | None = None, overwrite: bool = False,
            data: dict | None = None, mix: float = DEFAULT_FINETUNE_MIX):
    mix = _check_mix(mix)
    recipe = TrainRecipe(steps=steps, lr=lr, batch_size=batch_size, patch_size=patch_size, augment=augment,
                         seed=seed)
    return _train_package(model, images, labels, mode="finetune", recipe=recipe, out=out, name=name,
                          checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, progress=progress,
                          device=device, callback=callback, overwrite=overwrite, data=data, mix=mix)


def train_from_scratch(model, images, labels, *, steps: int = DEFAULT_RECIPE.steps, lr: float = DEFAULT_RECIPE.lr,
                       batch_size: int = DEFAULT_RECIPE.batch_size, patch_size: int = DEFAULT_RECIPE.patch_size,
                       augment: bool = True, seed: int = 0, checkpoint_dir=None, checkpoint_every: int = 50,
                       progress: bool = False, device: str = "cpu", out=None, name: str | None = None,
                       callback: Callable[[int, float], None] | None = None, overwrite: bool = False,
                      data: dict | None = None):
    recipe = TrainRecipe(steps=steps, lr=lr, batch_size=batch_size, patch_size=patch_size, augment=augment,
                         seed=seed)
    return _train_package(model, images, labels, mode="scratch", recipe=recipe, out=out, name=name,
                          checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, progress=progress,
                          device=device, callback=callback, overwrite=overwrite, data=data)


finetune.__doc__ = """Fine-tune a source model package on a few annotated tiles.

    The source's weights are trained further with :data:`DEFAULT_RECIPE` (Adam, BCE on
    boundary / affinity targets derived from the labels, augmentation) -- the same recipe
    :func:`train_from_scratch` uses, so the two are directly comparable -- and the result is then
    interpolated with the source's weights (WiSE-FT, ``mix`` of the fine-tuned network; default
    :data:`DEFAULT_FINETUNE_MIX`): a few tiles from the annotated sections pull the whole network
    towards them, and the midpoint keeps most of the gain there while holding on to what the source
    does well elsewhere in the volume (``docs/results.md`` §5.9). ``mix=1`` is plain fine-tuning.
""" + _TRAIN_DOC.replace("""    overwrite : bool
        Replace an existing package at ``out``.
""", """    overwrite : bool
        Replace an existing package at ``out``.
    mix : float
        Weight of the fine-tuned network in the returned weights, in (0, 1] (fine-tuning only).
""") + """
    Examples
    --------
    >>> import neuroadda_rt as nr
    >>> src = nr.load_model("tests/assets/tiny_model")                        # doctest: +SKIP
    >>> ft = nr.finetune(src, tiles, label_tiles, steps=200, out="ft_model")  # doctest: +SKIP
    >>> nr.evaluate(ft, test_images, test_labels).overall["vi_total"]         # doctest: +SKIP
"""

train_from_scratch.__doc__ = """Train the source's network architecture from a fresh initialisation on the tiles.

    The baseline of NeuroADDA's comparison: same architecture (``UNet(**model.config)``),
    same recipe as :func:`finetune`, weights initialised from ``seed`` instead of the
    source's training. The source package supplies only its config and intensity rule.
""" + _TRAIN_DOC + """
    Examples
    --------
    >>> import neuroadda_rt as nr
    >>> src = nr.load_model("tests/assets/tiny_model")                             # doctest: +SKIP
    >>> sc = nr.train_from_scratch(src, tiles, label_tiles, out="scratch_model")   # doctest: +SKIP
"""
