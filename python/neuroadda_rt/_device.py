"""Where computation runs: the one place that decides between CPU and CUDA kernels.

The ONNX Runtime / TensorRT execution choice for neural networks lives in
:mod:`neuroadda_rt.runtime`, which calls :func:`resolve_device` for the device part.
"""

from __future__ import annotations

import logging

from . import _core
from .errors import BackendUnavailableError, InputValueError

log = logging.getLogger("neuroadda_rt")

_VALID = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    """Whether the CUDA kernels were compiled in *and* a usable GPU is present now.

    Returns
    -------
    bool
        False on CPU-only builds, on machines without a driver, and without a GPU.

    Examples
    --------
    >>> import neuroadda_rt
    >>> isinstance(neuroadda_rt.cuda_available(), bool)
    True
    """
    return bool(_core.built_with_cuda()) and _core.cuda_device_count() > 0


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot be used, or None when they can."""
    if not _core.built_with_cuda():
        return ("this neuroadda_rt build has no CUDA kernels (built with NEUROADDA_ENABLE_CUDA=OFF "
                "or without nvcc); rebuild with NEUROADDA_ENABLE_CUDA=ON")
    if _core.cuda_device_count() == 0:
        return "the CUDA kernels are built but no usable GPU/driver is present on this machine"
    return None


def resolve_device(device: str) -> str:
    """Turn a user's ``device`` argument into ``"cpu"`` or ``"cuda"``.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        ``"auto"`` picks CUDA only when it was compiled and a GPU is present.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda"``.

    Raises
    ------
    ValueError
        For an unknown device name.
    BackendUnavailableError
        (a ``RuntimeError``) when ``"cuda"`` is requested but unavailable; the message says why.
    """
    if not isinstance(device, str) or device.lower() not in _VALID:
        raise InputValueError(f"device must be one of {_VALID}, got {device!r}")
    device = device.lower()
    if device == "cpu":
        return "cpu"
    reason = cuda_unavailable_reason()
    if device == "cuda":
        if reason is not None:
            raise BackendUnavailableError(f"device='cuda' requested but {reason}")
        return "cuda"
    return "cuda" if reason is None else "cpu"
