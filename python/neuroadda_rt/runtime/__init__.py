"""The inference runtime: the one subpackage that decides where and how networks execute.

- :mod:`~neuroadda_rt.runtime.source`: :class:`ModelSource`, what the runtime needs from a
  model (built from a UNet, an ONNX file, a package folder or a ``ModelPackage``), and the one
  place where raw tiles are normalised into a network batch;
- :mod:`~neuroadda_rt.runtime.backends`: the ONNX Runtime / TensorRT / PyTorch runners and the
  one backend decision (``auto`` / ``cpu`` / ``cuda``);
- :mod:`~neuroadda_rt.runtime.features`: :class:`FeatureExtractor` (pooled encoder features);
- :mod:`~neuroadda_rt.runtime.predictor`: :class:`Predictor` (sliding-window probabilities).
"""

from __future__ import annotations

from ..tiles import blend_weights
from .backends import BACKENDS, available_backends
from .features import POOLINGS, FeatureExtractor, config_feature_level
from .predictor import Predictor
from .source import DEFAULT_NORMALIZATION, ModelSource, ProvidesModelSource

__all__ = ["BACKENDS", "DEFAULT_NORMALIZATION", "POOLINGS", "FeatureExtractor", "ModelSource", "Predictor",
           "ProvidesModelSource", "available_backends", "blend_weights", "config_feature_level"]
