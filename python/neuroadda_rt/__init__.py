"""neuroadda_rt: pick the pretrained EM segmentation model to start from, the few tiles to
annotate, and watch acquisition for drift -- NeuroADDA (Sawmya et al., arXiv 2503.06196)
with a C++ core.

``import neuroadda_rt`` needs only NumPy. Everything that needs PyTorch, ONNX Runtime,
TensorRT, Dask or the I/O libraries is imported lazily on first use; a missing optional
dependency raises :class:`~neuroadda_rt.errors.MissingExtraError` naming the extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._core import __version__  # the one version: pyproject.toml -> CMake -> the compiled module
from ._device import cuda_available
from ._info import build_info
from .errors import (
    BackendUnavailableError,
    DTypeError,
    FormatError,
    InputValueError,
    IntegrityError,
    MissingExtraError,
    NeuroaddaError,
    ShapeError,
)

# Public name -> submodule that defines it. Resolved on first access (PEP 562) so that the
# heavy optional stacks are only imported by the features that need them.
_LAZY = {
    # core kernels
    "mmd2": "mmd",
    "mmd2_test": "mmd",
    "mmd2_matrix": "mmd",
    "median_sigma": "mmd",
    "MMDTestResult": "mmd",
    "tile_uncertainty": "uncertainty",
    "variation_of_information": "metrics",
    "adapted_rand_error": "metrics",
    "ContingencyTable": "metrics",
    # models, export, runtime, packages
    "UNet": "models",
    "export_onnx": "export",
    "quantize_int8": "export",
    "export_bioimageio": "bioimageio",
    "FeatureExtractor": "runtime",
    "Predictor": "runtime",
    "ModelPackage": "package",
    "load_model": "package",
    "save_model": "package",
    "Zoo": "package",
    "default_zoo": "package",
    "synthetic_zoo": "package",
    "build_zoo_from_datasets": "zoo_builder",
    # data
    "open_volume": "io",
    "Volume": "io",
    "normalize_intensity": "io",
    "sample_tiles": "tiles",
    "grid_tiles": "tiles",
    "Dataset": "datasets",
    "segment": "segmentation",
    "tune_threshold": "segmentation",
    # workflow
    "rank_sources": "ranking",
    "SourceRanking": "ranking",
    "select_tiles": "selection",
    "TileSelection": "selection",
    "finetune": "training",
    "train_from_scratch": "training",
    "evaluate": "evaluation",
    "run_workflow": "workflow",
    # deployment on whole volumes
    "predict_volume": "deploy",
    "segment_volume": "deploy",
    "evaluate_volume": "deploy",
    # atlas and QC
    "domain_atlas": "atlas",
    "compare_to_phylogeny": "atlas",
    "QCMonitor": "qc",
    "QCReport": "qc",
}

__all__ = sorted(
    [
        "__version__",
        "build_info",
        "cuda_available",
        "NeuroaddaError",
        "ShapeError",
        "DTypeError",
        "InputValueError",
        "BackendUnavailableError",
        "MissingExtraError",
        "FormatError",
        "IntegrityError",
        *_LAZY,
    ]
)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'neuroadda_rt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .metrics import ContingencyTable, adapted_rand_error, variation_of_information  # noqa: F401
    from .mmd import MMDTestResult, median_sigma, mmd2, mmd2_matrix, mmd2_test  # noqa: F401
    from .uncertainty import tile_uncertainty  # noqa: F401
