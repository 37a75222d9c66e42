"""The bundled learned fold / stain detector: its ONNX file against a float64 NumPy re-implementation from
the safetensors weights, and its place among the monitor's detectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuroadda_rt import QCMonitor
from neuroadda_rt.qc.artefact_net import MIN_SIZE, NET_DETECTORS, artefact_net_path, artefact_net_scores

pytestmark = pytest.mark.filterwarnings("ignore::neuroadda_rt.qc.QCCalibrationWarning")


def _record():
    return json.loads(artefact_net_path().with_suffix(".json").read_text())


def _conv3x3(x, w, b, stride):
    """(C, H, W) float64, zero padding 1, by explicit shifted sums (no library convolution)."""
    c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    out = np.zeros((w.shape[0], ho, wo))
    for dy in range(3):
        for dx in range(3):
            patch = xp[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
            out += np.einsum("oc,chw->ohw", w[:, :, dy, dx], patch)
    return out + b[:, None, None]


def _reference_scores(tiles):
    from safetensors.numpy import load_file

    wts = load_file(str(artefact_net_path().with_suffix(".safetensors")))
    strides = _record()["strides"]
    out = []
    for t in tiles:
        x = t[None].astype(np.float64) - 0.5
        for i, s in enumerate(strides):
            x = np.maximum(_conv3x3(x, wts[f"body.{2 * i}.weight"].astype(np.float64),
                                    wts[f"body.{2 * i}.bias"].astype(np.float64), s), 0)
        head = np.einsum("oc,chw->ohw", wts["head.weight"][:, :, 0, 0].astype(np.float64), x)
        head += wts["head.bias"].astype(np.float64)[:, None, None]
        out.append(head.reshape(len(NET_DETECTORS), -1).max(axis=1))
    return np.array(out)


def test_onnx_matches_float64_reimplementation(rng):
    """The shipped ONNX file computes what its safetensors weights say, at the trained 64 px and at other sizes."""
    for shape in ((3, 64, 64), (2, 40, 72), (1, MIN_SIZE, MIN_SIZE)):
        tiles = rng.random(shape).astype(np.float32)
        np.testing.assert_allclose(artefact_net_scores(tiles), _reference_scores(tiles), rtol=1e-4, atol=1e-4)


def test_record_says_how_it_was_trained():
    """The JSON record describes the shipped weights: its channels are the convolutions' output widths."""
    from safetensors.numpy import load_file

    rec = _record()
    assert rec["kinds"] == ["fold", "stain"] and "not apply_artefact" in rec["simulator"]
    assert set(rec["validation_recall_at_2pct_fp"]) == {"fold", "stain"}
    wts = load_file(str(artefact_net_path().with_suffix(".safetensors")))
    assert [wts[f"body.{2 * i}.weight"].shape[0] for i in range(len(rec["channels"]))] == rec["channels"]
    assert wts["head.weight"].shape[:2] == (len(rec["kinds"]), rec["channels"][-1])


def test_monitor_uses_it_when_tiles_allow(rng):
    enc = lambda t: np.stack([t.mean((1, 2)), t.std((1, 2))], 1).astype(np.float32)  # noqa: E731
    ref = rng.random((64, 32, 32)).astype(np.float32)
    on = QCMonitor(enc, ref, window=16)
    assert set(NET_DETECTORS) <= set(on.detectors)
    assert not set(NET_DETECTORS) & set(QCMonitor(enc, ref, window=16, artefact_net=False).detectors)
    small = rng.random((64, 8, 8)).astype(np.float32)
    assert not set(NET_DETECTORS) & set(QCMonitor(enc, small, window=16).detectors)


def test_bad_tiles_refused():
    from neuroadda_rt.errors import ShapeError

    with pytest.raises(ShapeError, match="at least 16 px"):
        artefact_net_scores(np.zeros((2, 8, 8), np.float32))
