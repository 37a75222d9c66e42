"""The exception family of neuroadda_rt.

Every error the package raises on purpose derives from :class:`NeuroaddaError`, and the
input errors also derive from the matching built-in (``ValueError``/``TypeError``), so
``except ValueError`` keeps working for callers who do not know our names.
"""

from __future__ import annotations


class NeuroaddaError(Exception):
    """Base class of every error raised on purpose by neuroadda_rt."""


class ShapeError(NeuroaddaError, ValueError):
    """An array has the wrong number of dimensions or mismatched sizes."""


class DTypeError(NeuroaddaError, TypeError):
    """An array has a dtype the function does not accept (and would not copy silently)."""


class InputValueError(NeuroaddaError, ValueError):
    """An input holds values outside the accepted range (NaN, inf, probabilities outside [0, 1], ...)."""


class BackendUnavailableError(NeuroaddaError, RuntimeError):
    """An explicitly requested device or backend (CUDA, TensorRT, ...) is not available."""


class MissingExtraError(NeuroaddaError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class FormatError(NeuroaddaError, ValueError):
    """A file is unreadable, truncated, of an unknown format, or lacks the requested dataset."""


class IntegrityError(NeuroaddaError, ValueError):
    """A model package or cache entry fails its checksum or is incomplete."""


class MissingChunksWarning(UserWarning):
    """A zarr volume lacks chunks inside its bounds; zarr reads them as the fill value. Legitimate by the
    zarr spec (writers skip all-fill chunks), but also what a deleted or not-yet-written chunk looks like."""


def require(module: str, extra: str):
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra.

    Parameters
    ----------
    module : str
        Importable module name, e.g. ``"onnxruntime"``.
    extra : str
        The pip extra that provides it, e.g. ``"runtime"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            f"{module} is required for this feature; install it with "
            f"`pip install 'neuroadda_rt[{extra}]'` (import failed: {exc})"
        ) from exc
