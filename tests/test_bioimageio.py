"""bioimage.io export: the package validates with bioimageio.spec, bioimageio.core runs it and reproduces
neuroadda_rt's own Predictor, and the pre-processing reproduces the package's intensity rule."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from neuroadda_rt.errors import InputValueError, ShapeError
from neuroadda_rt.io import intensity_rule, normalize_intensity

pytest.importorskip("torch", reason="export needs the torch extra")

# bioimageio.spec and bioimageio.core open the files they hash or read (zip, .npy, .tif) without closing them:
# ResourceWarnings (and pytest's "unraisable exception" wrappers of them) at collection time, not ours to fix
pytestmark = [pytest.mark.filterwarnings("ignore::ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

TINY = Path(__file__).resolve().parent / "assets" / "tiny_model"


def _apply_spec_ops(x: np.ndarray, steps: list[dict], axes: tuple[int, ...]) -> np.ndarray:
    """The bioimage.io 0.5 operations, written from the spec's formulae in float64 (independent of the package
    and of bioimageio.core)."""
    a = x.astype(np.float64)
    for s in steps:
        k = s.get("kwargs", {})
        if s["id"] == "ensure_dtype":
            assert k["dtype"] == "float32"
        elif s["id"] == "scale_linear":
            a = a * k["gain"] + k["offset"]
        elif s["id"] == "scale_range":
            lo = np.percentile(a, k["min_percentile"], axis=axes, keepdims=True)
            hi = np.percentile(a, k["max_percentile"], axis=axes, keepdims=True)
            a = (a - lo) / (hi - lo + k["eps"])
        elif s["id"] == "clip":
            a = np.clip(a, k["min"], k["max"])
        else:  # pragma: no cover - a step the reference does not know
            raise AssertionError(s)
    return a


@pytest.mark.parametrize("rule,dtype", [("dtype", np.uint8), ("dtype", np.uint16), ("dtype", np.int16),
                                        ("dtype", np.float32), ("percentile", np.uint16), ("percentile", np.float32),
                                        ({"rule": "fixed", "low": 20.0, "high": 180.0}, np.uint8)])
def test_preprocessing_reproduces_the_intensity_rule(rule, dtype, rng):
    from neuroadda_rt.bioimageio import preprocessing_for_rule

    if np.dtype(dtype).kind == "f":
        x = rng.normal(0.5, 0.4, (2, 1, 40, 50)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, (2, 1, 40, 50), endpoint=True).astype(dtype)
    steps = preprocessing_for_rule(rule, ["y", "x"], dtype)
    assert steps[0]["id"] == steps[-1]["id"] == "ensure_dtype"
    got = _apply_spec_ops(x, steps, axes=(2, 3))
    want = np.stack([normalize_intensity(t[0], intensity_rule(rule))[None] for t in x])  # per tile, as training
    np.testing.assert_allclose(got, want, atol=2e-6)


def _export(tmp_path, model, out, **kw):
    from neuroadda_rt.bioimageio import export_bioimageio

    return export_bioimageio(model, tmp_path / out, **kw)


@pytest.fixture(scope="module")
def percentile_model(tmp_path_factory):
    """The tiny asset re-saved under the percentile rule (same weights): exercises scale_range."""
    import neuroadda_rt as nr

    return nr.save_model(nr.load_model(TINY), tmp_path_factory.mktemp("pm") / "tiny_percentile",
                         normalization=intensity_rule("percentile", low=2, high=98), name="tiny-percentile")


def test_export_zip_validates_and_carries_the_model_card(tmp_path, rng):
    pytest.importorskip("bioimageio.spec", reason="validation needs the bioimageio extra")
    import neuroadda_rt as nr
    from neuroadda_rt.bioimageio import validate_bioimageio

    sample = rng.integers(0, 256, (3, 100, 90)).astype(np.uint8)
    out = _export(tmp_path, TINY, "tiny.zip", sample=sample, tile_size=62)  # rounded up to 64
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
    assert {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy", "weights.pt",
            "weights.torchscript.pt", "model.onnx"} <= names
    summary = validate_bioimageio(out)
    assert summary["status"] == "valid-format", summary["errors"]
    d = summary["description"]
    assert d.inputs[0].axes[1].channel_names == ["raw"] and d.outputs[0].axes[1].channel_names == ["boundary"]
    assert {w for w in ("onnx", "torchscript", "pytorch_state_dict") if getattr(d.weights, w) is not None} == \
        {"onnx", "torchscript", "pytorch_state_dict"}
    assert d.weights.onnx.parent == d.weights.torchscript.parent == "pytorch_state_dict"
    assert d.training_data is not None and "untrained test asset" in d.training_data.description
    assert any("2503.06196" in str(c.url) for c in d.cite)
    # the test tensors: the centre of the middle slice of the sample, and the Predictor's output on it
    with zipfile.ZipFile(out) as zf:
        zf.extractall(tmp_path / "x")
    tin = np.load(tmp_path / "x" / "test_input.npy")
    tout = np.load(tmp_path / "x" / "test_output.npy")
    assert tin.shape == (1, 1, 64, 64) and tin.dtype == np.uint8
    np.testing.assert_array_equal(tin[0, 0], sample[1, 18:82, 13:77])
    pkg = nr.load_model(TINY)
    ref = nr.Predictor(pkg, backend="torch", device="cpu").predict_tiles(tin[:, 0])
    np.testing.assert_allclose(tout, np.asarray(ref).reshape(tout.shape), atol=1e-5)
    from PIL import Image

    w, h = Image.open(tmp_path / "x" / "cover.png").size
    assert (w, h) == (128, 64)


def test_cover_of_a_trained_model(tmp_path):
    """The cover a lab sees in the zoo: a bundled (trained) package on a synthetic EM render; saved to
    docs/figures/ when NEUROADDA_WRITE_FIGURES=1 (the README's figure)."""
    import os

    from PIL import Image

    from neuroadda_rt.package import synthetic_zoo
    from neuroadda_rt.study.synthetic import make_domain

    zoo = synthetic_zoo(allow_empty=True)
    if not len(zoo):
        pytest.skip("no bundled synthetic zoo")
    image = make_domain(None, (256, 256), seed=11)[0]
    out = _export(tmp_path, zoo.paths[0], "syn", sample=image, tile_size=256, weights=("pytorch_state_dict",),
                  validate=False)
    cover = np.asarray(Image.open(out / "cover.png"))
    assert cover.shape == (256, 512, 3)
    np.testing.assert_array_equal(cover[..., 0][:, :256] == cover[..., 1][:, :256], True)  # grey input half
    probs = np.load(out / "test_output.npy")[0, 0]
    # the prediction half is the boundary probability in magenta
    np.testing.assert_allclose(cover[:, 256:, 0], (probs * 255).astype(np.uint8), atol=1)
    if os.environ.get("NEUROADDA_WRITE_FIGURES") == "1":
        dest = Path(__file__).resolve().parent.parent / "docs" / "figures" / "bioimageio_cover.png"
        Image.fromarray(cover).save(dest)


def test_bioimageio_core_reproduces_the_predictor(tmp_path, percentile_model):
    pytest.importorskip("bioimageio.core", reason="bioimageio.core is not installed (bioimageio extra)")
    import neuroadda_rt as nr
    from bioimageio.core import load_description, predict, test_model

    sample = (np.random.default_rng(3).gamma(2.0, 300.0, (70, 80)) + 1000).astype(np.uint16)
    out = _export(tmp_path, percentile_model, "tp.zip", sample=sample, tile_size=64)
    summary = test_model(out, weight_format="onnx")
    assert summary.status == "passed", [e.msg for d in summary.details for e in d.errors]
    descr = load_description(out)
    assert descr.inputs[0].preprocessing[1].id == "scale_range"
    tin = sample[3:67, 8:72].astype(np.float32)
    ref = nr.Predictor(percentile_model, backend="onnxruntime", device="cpu").predict_tiles(tin[None])
    ref = np.asarray(ref).reshape(1, 1, 64, 64)
    for fmt in ("onnx", "torchscript", "pytorch_state_dict"):
        from bioimageio.core import create_prediction_pipeline

        pp = create_prediction_pipeline(descr, weight_format=fmt)
        got = predict(model=pp, inputs={"raw": tin[None, None]})
        arr = np.asarray(got.members["probabilities"].data)
        assert np.abs(arr - ref).max() < 1e-4, (fmt, np.abs(arr - ref).max())


def test_3d_affinity_model_folder_validates(tmp_path):
    pytest.importorskip("bioimageio.spec", reason="validation needs the bioimageio extra")
    import neuroadda_rt as nr
    from neuroadda_rt.bioimageio import validate_bioimageio

    pkg = nr.load_model(TINY.parent / "tiny_affinities_3d")  # tools/make_test_assets.py: a 3-D export takes a minute
    out = _export(tmp_path, pkg, "aff3d_bioimageio", tile_size=16, weights=("pytorch_state_dict", "onnx"))
    assert (out / "rdf.yaml").is_file() and not (out / "weights.torchscript.pt").exists()
    summary = validate_bioimageio(out / "rdf.yaml")
    assert summary["status"] == "valid-format", summary["errors"]
    d = summary["description"]
    assert d.outputs[0].axes[1].channel_names == ["affinity_z", "affinity_y", "affinity_x"]
    assert [a.scale for a in d.inputs[0].axes[2:]] == [40.0, 4.0, 4.0]
    assert np.load(out / "test_output.npy").shape == (1, 3, 16, 16, 16)


def test_bad_input_leaves_nothing(tmp_path):
    from neuroadda_rt.bioimageio import export_bioimageio

    with pytest.raises(InputValueError, match="tile_size >= 4"):
        export_bioimageio(TINY, tmp_path / "a.zip", tile_size=2)
    with pytest.raises(ShapeError, match="at least"):
        export_bioimageio(TINY, tmp_path / "a.zip", sample=np.zeros((30, 30), np.uint8), tile_size=64)
    with pytest.raises(InputValueError, match="weight formats"):
        export_bioimageio(TINY, tmp_path / "a.zip", weights=("keras",))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a.zip").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        export_bioimageio(TINY, tmp_path / "a.zip")
    assert (tmp_path / "a.zip").read_bytes() == b"x"


def test_cli_export_bioimageio(tmp_path, capsys):
    from neuroadda_rt.cli import main

    rc = main(["export", str(TINY), "--format", "bioimageio", "--out", str(tmp_path / "m.zip"), "--tile-size", "32",
               "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["format"] == "bioimageio" and Path(res["out"]).is_file()
    with zipfile.ZipFile(res["out"]) as zf:
        assert "rdf.yaml" in zf.namelist()


def test_model_card_of_a_real_data_package(tmp_path, rng):
    """A package whose model card (model.json 'training', as zoo build --from-datasets writes it) names a
    free-text data licence and a citation: the weights carry the data's SPDX licence, or a LICENSE.md quoting
    non-SPDX terms; a citation with a DOI is cited, one without stays in the training data description."""
    pytest.importorskip("bioimageio.spec", reason="validation needs the bioimageio extra")
    import neuroadda_rt as nr
    from neuroadda_rt.bioimageio import spdx_license, validate_bioimageio

    assert spdx_license("CC BY-NC-SA 3.0") == "CC-BY-NC-SA-3.0"
    assert spdx_license("BSD-3-Clause (gala); see LICENSE.txt beside the data") == "BSD-3-Clause"
    assert spdx_license("ISBI 2012 challenge terms (research use); see SOURCE_LICENSE_* beside the data") is None
    base = nr.load_model(TINY)
    cases = {
        "gerhard": ({"data": "gerhard: split 'train'", "license": "CC BY-NC-SA 3.0", "dataset": {"name": "gerhard"},
                     "citation": "Gerhard et al. figshare 2013, doi:10.6084/m9.figshare.856713"}, "CC-BY-NC-SA-3.0"),
        "isbi": ({"data": "isbi: split 'train'", "license": "ISBI 2012 challenge terms (research use)",
                  "citation": "Arganda-Carreras et al., Front. Neuroanat. 2015"}, None),
    }
    for name, (training, want) in cases.items():
        pkg = nr.save_model(base, tmp_path / name, training=training, name=f"{name}-model")
        out = _export(tmp_path, pkg, f"{name}_bio", tile_size=32, weights=("pytorch_state_dict",))
        s = validate_bioimageio(out / "rdf.yaml")
        assert s["status"] == "valid-format", s["errors"]
        d = s["description"]
        texts = [c.text for c in d.cite]
        if want:
            assert str(d.license) == want and str(d.training_data.license) == want
            assert any("figshare" in t for t in texts)
        else:
            assert "research use" in (out / "LICENSE.md").read_text() and d.training_data.license is None
            assert not any("Arganda" in t for t in texts) and "Arganda" in d.training_data.description
