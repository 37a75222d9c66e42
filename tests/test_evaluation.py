"""evaluate(): VI split/merge/total and adapted Rand error against scikit-image on the same segmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
skm = pytest.importorskip("skimage.metrics")

from neuroadda_rt.errors import ShapeError  # noqa: E402
from neuroadda_rt.evaluation import Evaluation, evaluate, score_segmentation, stored_threshold  # noqa: E402

TINY = Path(__file__).resolve().parent / "assets" / "tiny_model"


def _reference(seg, gt):
    split, merge = skm.variation_of_information(gt, seg, ignore_labels=(0,))
    are = skm.adapted_rand_error(gt, seg, ignore_labels=(0,))[0]
    return float(split), float(merge), float(are)


@pytest.mark.parametrize("seed", range(4))
def test_score_segmentation_matches_skimage(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 6, size=(40, 30)).astype(np.uint32)
    seg = (gt * 3 + rng.integers(0, 2, size=gt.shape) * (rng.random(gt.shape) < 0.3)).astype(np.int64)
    seg[rng.random(gt.shape) < 0.1] = 99  # a merged blob
    s = score_segmentation(seg, gt)
    split, merge, are = _reference(seg, gt)
    assert s["vi_split"] == pytest.approx(split, abs=1e-9)
    assert s["vi_merge"] == pytest.approx(merge, abs=1e-9)
    assert s["vi_total"] == pytest.approx(split + merge, abs=1e-9)
    assert s["adapted_rand_error"] == pytest.approx(are, abs=1e-9)


def test_score_segmentation_perfect_and_shape_checked():
    gt = np.repeat([[1, 1, 0, 2, 2]], 4, axis=0).astype(np.uint32)
    s = score_segmentation(gt * 7, gt)
    assert s["vi_total"] == 0.0 and s["adapted_rand_error"] == 0.0
    with pytest.raises(ShapeError):
        score_segmentation(gt[:2], gt)


@pytest.fixture(scope="module")
def data():
    from neuroadda_rt.study.synthetic import make_domain

    img, lab = make_domain(None, (3, 64, 64), seed=5)
    return img, lab


@pytest.fixture(scope="module")
def tiny():
    from neuroadda_rt.package import load_model

    return load_model(TINY)


def test_evaluate_matches_skimage_on_its_own_segmentations(tiny, data):
    img, lab = data
    ev = evaluate(tiny, img, lab, threshold=0.5, backend="torch", device="cpu", keep_segmentations=True)
    assert isinstance(ev, Evaluation) and len(ev.per_image) == 3 and len(ev.segmentations) == 3
    assert ev.threshold == 0.5 and ev.threshold_source == "argument"
    for row, seg, gt in zip(ev.per_image, ev.segmentations, lab):
        split, merge, are = _reference(seg, gt)
        assert row["vi_split"] == pytest.approx(split, abs=1e-9)
        assert row["vi_merge"] == pytest.approx(merge, abs=1e-9)
        assert row["vi_total"] == pytest.approx(split + merge, abs=1e-9)
        assert row["adapted_rand_error"] == pytest.approx(are, abs=1e-9)
    for key in ("vi_split", "vi_merge", "vi_total", "adapted_rand_error"):
        assert ev.overall[key] == pytest.approx(np.mean([r[key] for r in ev.per_image]))
    assert ev.vi_total == ev.overall["vi_total"]


def test_evaluate_segments_the_models_probabilities(tiny, data):
    """The segmentation is segment(Predictor(model).predict(image)) at the threshold, nothing else."""
    from neuroadda_rt.runtime import Predictor
    from neuroadda_rt.segmentation import segment

    img, lab = data
    ev = evaluate(tiny, img[:1], lab[:1], threshold=0.4, backend="torch", device="cpu", keep_segmentations=True)
    p = Predictor(tiny, backend="torch", device="cpu").predict(img[0])[0]
    assert np.array_equal(ev.segmentations[0], segment(p, "boundary", threshold=0.4))


def test_threshold_comes_from_model_json(tiny, data, tmp_path):
    from neuroadda_rt.package import save_model

    img, lab = data
    assert stored_threshold(tiny) is None
    pkg = save_model(tiny, tmp_path / "m", extra={"segmentation": {"threshold": 0.3}})
    assert stored_threshold(pkg) == 0.3
    ev = evaluate(pkg, img[:1], lab[:1], backend="torch", device="cpu")
    assert ev.threshold == 0.3 and ev.threshold_source == "model.json"
    ev2 = evaluate(pkg, img[:1], lab[:1], threshold=0.3, backend="torch", device="cpu")
    assert ev2.overall == ev.overall


def test_to_dict_and_to_frame(tiny, data):
    img, lab = data
    ev = evaluate(tiny, list(img[:2]), list(lab[:2]), threshold=0.5, backend="torch", device="cpu")
    d = ev.to_dict()
    assert d["n_images"] == 2 and set(d["overall"]) == {"vi_split", "vi_merge", "vi_total", "adapted_rand_error"}
    assert d["overall"]["vi_total"] == ev.vi_total
    import json

    json.dumps(d)  # plain JSON types
    pytest.importorskip("pandas")
    f = ev.to_frame()
    assert list(f.index) == [0, 1, "overall"]
    assert f.loc["overall", "vi_total"] == pytest.approx(ev.vi_total)


def test_bad_inputs(tiny, data):
    img, lab = data
    with pytest.raises(ShapeError):
        evaluate(tiny, img, lab[:2], threshold=0.5, backend="torch", device="cpu")
    with pytest.raises(ShapeError):
        evaluate(tiny, img[:, :32], lab, threshold=0.5, backend="torch", device="cpu")
    with pytest.raises(ValueError):
        evaluate(tiny, img, lab.astype(np.float32), threshold=0.5, backend="torch", device="cpu")
