"""Probabilities for whole images and volumes by overlapping, blended windows: :class:`Predictor`."""

from __future__ import annotations

import itertools

import numpy as np

from ..errors import InputValueError, ShapeError
from ..io.intensity import freeze_rule
from ..tiles import blend_weights, window_starts
from .backends import RunnerInfo, make_runner
from .source import DEFAULT_NORMALIZATION, as_model_source, first_len, network_batch, progress_bar


def _as_probabilities(out: np.ndarray) -> np.ndarray:
    """float32 probabilities clipped in place to [0, 1]: a float32 sigmoid (ONNX Runtime) and the
    window blending can round to 1 + 1 ulp, which downstream range checks rightly refuse."""
    out = out.astype(np.float32, copy=False)
    np.clip(out, 0.0, 1.0, out=out)
    return out


class Predictor(RunnerInfo):
    """Probabilities for a whole 2-D image or 3-D volume by overlapping, smoothly blended windows.

    Callers pass the *raw* image (as read from the volume): the predictor applies the model's
    intensity rule itself, exactly once. Normalising beforehand would apply it twice.

    Parameters
    ----------
    model_or_path : UNet, ModelPackage, ModelSource, str or path-like
        A network, a loaded package (or anything with a ``model_source()`` method), a package
        folder, or a full-model ONNX file
        (``part="full"``) from :func:`~neuroadda_rt.export_onnx`.
    backend, device, ort_providers, trt_profile, fp16, cache_dir, threads
        As for :class:`FeatureExtractor` (the same decision code).
    tile : int or tuple of int, optional
        Window size per spatial axis (default 256 in 2-D, ``(32, 128, 128)`` in 3-D). Axes
        shorter than the window use a window of their full length.
    overlap : float
        Fraction of the window shared with its neighbour, in ``[0, 1)`` (default 0.25).
    batch_size : int
        Windows per network call.
    blend : {"cosine", "gaussian", "constant"}
        Weights of the weighted average where windows overlap (see
        :func:`neuroadda_rt.tiles.blend_weights`).
    normalize : bool
        Apply the model's intensity rule to the raw image. Statistics-based rules (``"percentile"``) are computed on
        the whole 2-D image, on each slice when a 2-D model runs over a volume, or on the whole
        volume for a 3-D model, then applied to every window identically.

    Examples
    --------
    >>> import numpy as np
    >>> from neuroadda_rt import Predictor
    >>> from neuroadda_rt.models import UNet
    >>> pr = Predictor(UNet(widths=(4, 8)), backend="torch", device="cpu", tile=32)
    >>> pr.predict(np.random.rand(50, 70).astype(np.float32)).shape
    (1, 50, 70)
    """

    def __init__(self, model_or_path, *, backend: str = "auto", device: str = "auto", tile=None,
                 overlap: float = 0.25, batch_size: int = 8, blend: str = "cosine",
                 ort_providers: list[str] | None = None, trt_profile: dict | None = None, fp16: bool = False,
                 cache_dir=None, threads: int | None = None, normalize: bool = True):
        if not 0.0 <= float(overlap) < 1.0:
            raise InputValueError(f"expected 0 <= overlap < 1, got {overlap}")
        if int(batch_size) < 1:
            raise InputValueError(f"expected batch_size >= 1, got {batch_size}")
        blend_weights((2,), blend)  # validates the name
        self._source = as_model_source(model_or_path)
        dim = self._source.dim
        if tile is None:
            tile = (256, 256) if dim == 2 else (32, 128, 128)
        tile = (int(tile),) * dim if np.isscalar(tile) else tuple(int(t) for t in tile)
        if len(tile) != dim or min(tile) < self._source.multiple:
            raise InputValueError(f"expected {dim} window sizes >= {self._source.multiple} (2**(depth-1)), "
                                  f"got {tile}")
        self.tile, self.overlap, self.batch_size, self.blend = tile, float(overlap), int(batch_size), blend
        self.normalize = bool(normalize)
        self._runner = make_runner(self._source, "full", backend=backend, device=device,
                                   ort_providers=ort_providers, trt_profile=trt_profile, fp16=fp16,
                                   cache_dir=cache_dir, threads=threads, who="Predictor")
        self._weights: dict[tuple[int, ...], np.ndarray] = {}

    @property
    def out_channels(self) -> int:
        """1 for boundary models, 2 (2-D) or 3 (3-D) for affinity models."""
        # same rule as models.HEAD_CHANNELS, without importing torch
        return 1 if self._source.config.get("head", "boundary") == "boundary" else self._source.dim

    def predict_tiles(self, tiles, batch_size: int | None = None) -> np.ndarray:
        """Network outputs for a batch of raw tiles, ``(N, C_out, *spatial)`` float32 (no blending).

        ``tiles`` as for :meth:`FeatureExtractor.features` (read in batches, never modified).
        """
        bs = int(batch_size or self.batch_size)
        n = first_len(tiles)
        outs = []
        for i in range(0, n, bs):
            outs.append(self._runner(network_batch(tiles[i:i + bs], self._source, normalize=self.normalize)))
        if not outs:
            return np.empty((0, self.out_channels), np.float32)
        return _as_probabilities(np.concatenate(outs))

    def predict(self, image, *, progress: bool = False) -> np.ndarray:
        """Blended probabilities for a whole image or volume.

        Parameters
        ----------
        image : array-like
            2-D model: ``(H, W)`` image or ``(D, H, W)`` volume (predicted slice by slice);
            3-D model: ``(D, H, W)`` volume. Models with several input channels take a leading
            channel axis. NumPy arrays, h5py/zarr datasets or lazy volumes: only the windows
            (or slices) are read. Never modified.
        progress : bool
            Show a tqdm progress bar over windows.

        Returns
        -------
        numpy.ndarray
            ``(C_out, *spatial)`` float32 probabilities, spatial shape equal to the input's.
        """
        shape = tuple(int(s) for s in getattr(image, "shape", np.shape(image)))
        c_in, dim = self._source.in_channels, self._source.dim
        spatial = shape[1:] if c_in > 1 else shape
        if c_in > 1 and (len(shape) < 1 or shape[0] != c_in):
            raise ShapeError(f"expected a leading axis of {c_in} channels, got shape {shape}")
        if len(spatial) not in ((2, 3) if dim == 2 else (3,)):
            raise ShapeError(f"expected a {'2-D image or 3-D volume' if dim == 2 else '3-D volume'} for a "
                             f"{dim}-D model, got spatial shape {spatial}")
        if min(spatial) < 1:
            raise ShapeError(f"expected a non-empty image, got shape {shape}")
        out = np.empty((self.out_channels, *spatial), dtype=np.float32)
        if dim == 2 and len(spatial) == 3:
            per_slice = self._n_windows(spatial[1:])
            bar = progress_bar(per_slice * spatial[0], progress, "predict")
            try:
                for z in range(spatial[0]):
                    sl = np.asarray(image[:, z] if c_in > 1 else image[z])
                    out[:, z] = self._predict_array(sl, spatial[1:], bar)
            finally:
                if bar is not None:
                    bar.close()
            return _as_probabilities(out)
        bar = progress_bar(self._n_windows(spatial), progress, "predict")
        try:
            out[...] = self._predict_array(image, spatial, bar)
        finally:
            if bar is not None:
                bar.close()
        return _as_probabilities(out)

    # -- internals -------------------------------------------------------------------------
    def _steps(self, spatial) -> list[list[int]]:
        tiles = [min(t, s) for t, s in zip(self.tile, spatial)]
        return [window_starts(s, t, max(1, int(round(t * (1 - self.overlap))))) for s, t in zip(spatial, tiles)]

    def _n_windows(self, spatial) -> int:
        return int(np.prod([len(s) for s in self._steps(spatial)]))

    def _rule_for(self, image) -> dict:
        """The intensity rule for every window of ``image``: a percentile rule is frozen to the
        whole image's percentiles, so that all windows are normalised identically."""
        rule = self._source.normalization or DEFAULT_NORMALIZATION
        return freeze_rule(rule, image) if self.normalize else rule

    def _predict_array(self, image, spatial, bar) -> np.ndarray:
        c_in, m = self._source.in_channels, self._source.multiple
        # axes shorter than 2**(depth-1) cannot be reflect-padded inside the graph: pad here
        # (symmetric, any amount) and crop back
        if min(spatial) < m:
            a = np.asarray(image)
            pads = [(0, max(0, m - s)) for s in spatial]
            a = np.pad(a, ([(0, 0)] if c_in > 1 else []) + pads, mode="symmetric")
            big = self._predict_array(a, tuple(s + p[1] for s, p in zip(spatial, pads)), bar)
            return big[(slice(None),) + tuple(slice(0, s) for s in spatial)]
        rule = self._rule_for(image)
        starts = self._steps(spatial)
        win = tuple(min(t, s) for t, s in zip(self.tile, spatial))
        w = self._weights.get(win)
        if w is None:
            w = self._weights[win] = blend_weights(win, self.blend)
        acc = np.zeros((self.out_channels, *spatial), dtype=np.float32)
        wsum = np.zeros(spatial, dtype=np.float32)
        corners = list(itertools.product(*starts))
        for i in range(0, len(corners), self.batch_size):
            chunk = corners[i:i + self.batch_size]
            sls = [tuple(slice(c, c + t) for c, t in zip(corner, win)) for corner in chunk]
            batch = np.stack([np.asarray(image[((slice(None),) if c_in > 1 else ()) + s]) for s in sls])
            probs = self._runner(network_batch(batch, self._source, rule=rule, normalize=self.normalize))
            for s, p in zip(sls, probs):
                acc[(slice(None),) + s] += p * w
                wsum[s] += w
            if bar is not None:
                bar.update(len(chunk))
        acc /= wsum
        return acc
