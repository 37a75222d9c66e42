"""predict_volume / segment_volume / evaluate_volume: blockwise results against one-shot references
(Predictor, segment, the metrics on whole arrays), resume after a failure, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("zarr")

import neuroadda_rt  # noqa: E402
from neuroadda_rt import Predictor, open_volume  # noqa: E402
from neuroadda_rt.deploy import InjectedFailure, predict_volume  # noqa: E402
from neuroadda_rt.errors import InputValueError, ShapeError  # noqa: E402
from neuroadda_rt.io import write_volume  # noqa: E402
from neuroadda_rt.models import UNet  # noqa: E402

KW = dict(scheduler="synchronous", progress=False)


TINY = Path(__file__).resolve().parent / "assets" / "tiny_model"


@pytest.fixture(scope="module")
def net2():
    return neuroadda_rt.load_model(TINY)  # a 2-D boundary package with its ONNX files: nothing to export


@pytest.fixture(scope="module")
def net3():
    torch.manual_seed(1)
    return UNet(dim=3, widths=(3, 6), head="affinities").eval()


@pytest.fixture(scope="module")
def vol():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, (5, 100, 130), dtype=np.uint8)
    return (v // 2 + 64 * (np.indices(v.shape)[2] % 23 < 3)).astype(np.uint8)  # some structure


def _read(path):
    return open_volume(path)[...]


def test_blockwise_equals_one_shot_2d(tmp_path, net2, vol):
    ref = Predictor(net2, backend="onnxruntime", tile=32, overlap=0.25).predict(vol)
    r = predict_volume(net2, vol, tmp_path / "p.zarr", block_shape=(2, 48, 64), halo=32, dtype="float32", **KW)
    got = _read(tmp_path / "p.zarr")
    assert got.shape == ref.shape == (1, 5, 100, 130)
    assert np.abs(got - ref).max() <= 1e-4
    assert r.n_blocks == 3 * 2 * 2 and r.blocks_computed == r.n_blocks
    # every window of the one-shot grid ran exactly once: 5 slices x (y 0, 24, 48, 68) x (x 0, 24, 48, 72, 96, 98)
    assert r.windows == 5 * 4 * 6


def test_blockwise_equals_one_shot_3d_threads(tmp_path, net3, vol):
    # PyTorch on both sides (an ONNX export of a 3-D network takes longer than the test)
    ref = Predictor(net3, backend="torch", tile=(4, 32, 32), overlap=0.25).predict(vol)
    r = predict_volume(net3, vol, tmp_path / "p.zarr", block_shape=(4, 40, 40), halo=(4, 32, 32), backend="torch",
                       dtype="float32", scheduler="threads", workers=2, progress=False)
    got = _read(tmp_path / "p.zarr")
    assert got.shape == ref.shape == (3, 5, 100, 130)
    assert np.abs(got - ref).max() <= 1e-4
    assert r.n_blocks == 1 * 2 * 3  # z: 5 < 4 + 4 merges the last z block; x: 130 -> [0, 40, 80, 130]


def test_output_is_ome_zarr_with_voxel_size(tmp_path, net2, vol):
    src = tmp_path / "in.h5"
    write_volume(f"{src}:raw", vol, voxel_size_nm=(30.0, 4.0, 4.0))
    predict_volume(net2, f"{src}:raw", tmp_path / "p.zarr", block_shape=(5, 64, 64), halo=32, dtype="uint8", **KW)
    attrs = json.loads((tmp_path / "p.zarr" / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["axes"][1] == {"name": "z", "type": "space", "unit": "nanometer"}
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 30.0, 4.0, 4.0]
    assert attrs["neuroadda_rt"]["complete"] is True
    v = open_volume(tmp_path / "p.zarr")
    assert v.dtype == np.uint8 and v.voxel_size_nm == (1.0, 30.0, 4.0, 4.0)
    ref = Predictor(net2, backend="onnxruntime", tile=32).predict(vol)
    assert np.abs(v[...].astype(np.float32) / 255 - ref).max() <= 0.5 / 255 + 1e-4


def test_resume_after_failure_computes_every_block_once(tmp_path, net2, vol):
    args = dict(block_shape=(1, 48, 64), halo=32, dtype="float32", **KW)
    full = predict_volume(net2, vol, tmp_path / "full.zarr", **args)
    k = int(np.random.default_rng(7).integers(1, full.n_blocks - 1))
    with pytest.raises(InjectedFailure):
        predict_volume(net2, vol, tmp_path / "p.zarr", _fail_at_block=k, **args)
    done = sorted((tmp_path / "p.zarr" / ".neuroadda" / "done").iterdir())
    assert len(done) == k  # blocks run in C order in-process: exactly the ones before k
    assert json.loads((tmp_path / "p.zarr" / ".zattrs").read_text())["neuroadda_rt"]["complete"] is False
    r = predict_volume(net2, vol, tmp_path / "p.zarr", **args)
    assert r.blocks_skipped == k and r.blocks_computed == full.n_blocks - k  # none twice
    assert np.array_equal(_read(tmp_path / "p.zarr"), _read(tmp_path / "full.zarr"))
    again = predict_volume(net2, vol, tmp_path / "p.zarr", **args)
    assert again.blocks_computed == 0 and again.windows == 0
    # max_blocks: a prefix of the grid now, the rest later, same output
    part = predict_volume(net2, vol, tmp_path / "m.zarr", max_blocks=4, **args)
    assert part.blocks_computed == 4
    rest = predict_volume(net2, vol, tmp_path / "m.zarr", **args)
    assert rest.blocks_computed == full.n_blocks - 4
    assert np.array_equal(_read(tmp_path / "m.zarr"), _read(tmp_path / "full.zarr"))


def test_percentile_rule_frozen_on_the_whole_volume(tmp_path, net2, vol):
    from neuroadda_rt.deploy import _frozen_rule
    r = _frozen_rule({"rule": "percentile", "low": 1.0, "high": 99.0}, vol, False, vol.shape, (2, 48, 64))
    lo, hi = np.percentile(vol, [1.0, 99.0])
    assert r == {"rule": "fixed", "low": pytest.approx(lo, abs=1e-9), "high": pytest.approx(hi, abs=1e-9)}
    v16 = (vol.astype(np.uint16) * 251 + 7).astype(np.uint16)
    r = _frozen_rule({"rule": "percentile", "low": 2.5, "high": 97.5}, v16, False, v16.shape, (3, 33, 50))
    lo, hi = np.percentile(v16, [2.5, 97.5])
    assert (r["low"], r["high"]) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))


def test_int8_close_to_fp32(tmp_path, net2, vol):
    r = predict_volume(net2, vol, tmp_path / "q.zarr", block_shape=(5, 100, 130), halo=32, precision="int8",
                       dtype="float32", **KW)
    assert r.precision == "int8" and (tmp_path / "q.zarr" / ".neuroadda" / "model.onnx").is_file()
    ref = Predictor(net2, backend="onnxruntime", tile=32).predict(vol)
    got = _read(tmp_path / "q.zarr")
    assert np.abs(got - ref).mean() < 0.02


def test_torch_backend_matches(tmp_path, net2, vol):
    r = predict_volume(net2, vol[:2], tmp_path / "t.zarr", block_shape=(1, 64, 64), halo=32, backend="torch",
                       dtype="float32", **KW)
    assert r.backend == "torch"
    ref = Predictor(net2, backend="torch", tile=32).predict(vol[:2])
    assert np.abs(_read(tmp_path / "t.zarr") - ref).max() <= 1e-4


# ------------------------------------------------------------------------------------------- bad input
def _no_output(path: Path) -> bool:
    return not path.exists()


def test_bad_inputs_are_one_line_errors(tmp_path, net2, net3, vol):
    out = tmp_path / "p.zarr"
    two_ch = UNet(widths=(4, 8), in_channels=2).eval()
    with pytest.raises(ShapeError, match="2 input channels"):
        predict_volume(two_ch, vol, out, **KW)
    with pytest.raises(ShapeError, match="3-D volume for a 3-D model"):
        predict_volume(net3, vol[0], out, **KW)
    with pytest.raises(InputValueError, match="at least the halo"):
        predict_volume(net2, vol, out, block_shape=(2, 16, 64), halo=32, **KW)
    assert _no_output(out)
    bad = vol.astype(np.float32) / 255
    bad[3, 90, 120] = np.nan
    with pytest.raises(InputValueError, match=r"NaN/inf at voxel \(3, 90, 120\)"):
        predict_volume(net2, bad, out, block_shape=(1, 64, 64), halo=32, **KW)
    assert _no_output(out)  # nothing a later run could resume or mistake for finished
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "keep.txt").write_text("not ours")
    with pytest.raises(InputValueError, match="--overwrite"):
        predict_volume(net2, vol, other, **KW)
    assert (other / "keep.txt").read_text() == "not ours"
    predict_volume(net2, vol[:1], other, overwrite=True, block_shape=(1, 100, 130), halo=32, **KW)
    assert not (other / "keep.txt").exists()
    # the same output with other parameters is "other content" too
    with pytest.raises(InputValueError, match="other parameters"):
        predict_volume(net2, vol[:1], other, block_shape=(1, 50, 130), halo=32, **KW)
    for e in (ShapeError, InputValueError):
        assert issubclass(e, neuroadda_rt.errors.NeuroaddaError)


# ------------------------------------------------------------------------------------------- segment
def _voronoi_boundaries(shape, n_cells, seed):
    """A boundary map of anisotropic Voronoi cells (high on the faces between cells) plus noise."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform([0, 0, 0], shape, (n_cells, 3))
    zz, yy, xx = np.indices(shape)
    d = np.sort(np.stack([((zz - p[0]) * 3) ** 2 + (yy - p[1]) ** 2 + (xx - p[2]) ** 2 for p in pts]), axis=0)
    gap = np.sqrt(d[1]) - np.sqrt(d[0])
    return np.clip(np.exp(-gap / 2.0) + rng.normal(0, 0.05, shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("per_slice", [False, True])
def test_segment_volume_matches_one_shot(tmp_path, per_slice):
    from neuroadda_rt import segment, variation_of_information
    from neuroadda_rt.deploy import segment_volume
    b = _voronoi_boundaries((10, 110, 140), 50, seed=3)
    ref = segment(b, "boundary", threshold=0.5, per_slice=per_slice)
    r = segment_volume(b, tmp_path / "s.zarr", threshold=0.5, block_shape=(4, 48, 64), per_slice=per_slice, **KW)
    got = open_volume(tmp_path / "s.zarr")
    assert got.dtype == np.uint64 and got.shape == b.shape
    seg = got[...]
    split, merge = variation_of_information(seg, ref, ignore_gt=())
    assert split + merge <= 0.05
    assert r.n_blocks == 3 * 3 * 3 and r.fragments > r.segments == len(np.unique(seg))
    assert r.face_merges > 0
    # ids are consecutive 1..n (no id is shared by two blocks' unrelated fragments)
    assert np.array_equal(np.unique(seg), np.arange(1, r.segments + 1))


def test_segment_volume_from_predict_output(tmp_path, net2, vol):
    from neuroadda_rt.deploy import segment_volume
    predict_volume(net2, vol, tmp_path / "p.zarr", block_shape=(5, 64, 64), halo=32, dtype="uint8", **KW)
    r = segment_volume(tmp_path / "p.zarr", tmp_path / "s.zarr", block_shape=(5, 50, 65), **KW)
    v = open_volume(tmp_path / "s.zarr")
    assert v.shape == vol.shape and v.dtype == np.uint64 and r.segments >= 1
    again = segment_volume(tmp_path / "p.zarr", tmp_path / "s.zarr", block_shape=(5, 50, 65), **KW)
    assert again.seconds == 0.0 and again.segments == r.segments  # finished: not redone
    with pytest.raises(InputValueError, match="--overwrite"):
        segment_volume(tmp_path / "p.zarr", tmp_path / "s.zarr", threshold=0.3, **KW)


def test_evaluate_volume_bit_for_bit(tmp_path):
    from neuroadda_rt import adapted_rand_error, variation_of_information
    from neuroadda_rt.deploy import evaluate_volume
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 40, (9, 70, 50)).astype(np.uint64)
    seg = (gt * 3 + (rng.random(gt.shape) < 0.1)).astype(np.int32)
    write_volume(tmp_path / "seg.h5:s", seg)
    split, merge = variation_of_information(seg, gt)
    err, prec, rec = adapted_rand_error(seg, gt)
    for sched in ("synchronous", "threads"):
        e = evaluate_volume(tmp_path / "seg.h5", gt, block_shape=(4, 32, 17), scheduler=sched, workers=2)
        assert (e["vi_split"], e["vi_merge"]) == (split, merge)  # exact, not approx
        assert (e["adapted_rand_error"], e["are_precision"], e["are_recall"]) == (err, prec, rec)
        assert e["blocks"] == 3 * 3 * 3 and e["voxels"] == gt.size


def test_cli_predict_and_segment(tmp_path, vol, capsys):
    from neuroadda_rt.cli import main
    tiny = TINY
    write_volume(f"{tmp_path / 'v.h5'}:raw", vol[:2], voxel_size_nm=(30.0, 4.0, 4.0))
    common = ["--scheduler", "synchronous", "--no-progress"]
    assert main(["predict", str(tiny), f"{tmp_path / 'v.h5'}:raw", "--out", str(tmp_path / "p.zarr"), "--halo", "64",
                 "--block-shape", "1,64,64", "--json", *common]) == 0
    r = json.loads(capsys.readouterr().out)
    # z 2 blocks; y 100 = one block (a 36-voxel rest < halo is merged); x 130 = [0, 64) + [64, 130)
    assert r["n_blocks"] == 4 and r["blocks_computed"] == 4 and r["shape"] == [1, 2, 100, 130]
    # a second run finds every block done
    assert main(["predict", str(tiny), f"{tmp_path / 'v.h5'}:raw", "--out", str(tmp_path / "p.zarr"), "--halo", "64",
                 "--block-shape", "1,64,64", "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out)["blocks_computed"] == 0
    assert main(["predict", str(tiny), f"{tmp_path / 'v.h5'}:raw", "--out", str(tmp_path / "p.zarr"), "--halo", "64",
                 "--block-shape", "1,32,64", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "at least the halo" in err and len(err.splitlines()) == 1
    assert main(["segment", str(tmp_path / "p.zarr"), "--out", str(tmp_path / "s.zarr"), "--gt", str(tmp_path / "s.zarr"),
                 "--json", *common]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["scores"]["vi"] == 0.0 and s["segments"] >= 1


def test_dask_scheduler_address_and_fallback(tmp_path, net2, vol, monkeypatch):
    """A running cluster by its address (here an in-process one, quick to start) gives the same
    output as in-process blocks; without distributed installed the default runs in process."""
    distributed = pytest.importorskip("distributed")
    import sys
    from neuroadda_rt import deploy
    args = dict(block_shape=(1, 48, 64), halo=32, dtype="float32", progress=False)
    ref = predict_volume(net2, vol[:2], tmp_path / "ref.zarr", scheduler="synchronous", **args)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as c:
        r = predict_volume(net2, vol[:2], tmp_path / "d.zarr", scheduler=c.scheduler_address, **args)
    assert "://" in r.scheduler and r.blocks_computed == ref.n_blocks
    assert np.array_equal(_read(tmp_path / "d.zarr"), _read(tmp_path / "ref.zarr"))
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    assert deploy._scheduler_name(None) == "synchronous"
    r = predict_volume(net2, vol[:2], tmp_path / "n.zarr", **args)
    assert r.scheduler == "synchronous" and np.array_equal(_read(tmp_path / "n.zarr"), _read(tmp_path / "ref.zarr"))
    with pytest.raises(InputValueError, match="scheduler"):
        predict_volume(net2, vol[:2], tmp_path / "x.zarr", scheduler="bogus", **args)


def test_failed_setup_leaves_nothing(tmp_path, net2, vol, monkeypatch):
    """A failure between creating the output and recording the run (here: int8 quantisation)
    removes the output, so no later run finds a half-made one."""
    from neuroadda_rt import export

    def boom(*a, **k):
        raise RuntimeError("quantisation failed")

    monkeypatch.setattr(export, "quantize_int8", boom)
    with pytest.raises(RuntimeError, match="quantisation failed"):
        predict_volume(net2, vol, tmp_path / "q.zarr", halo=32, precision="int8", **KW)
    assert not (tmp_path / "q.zarr").exists()


@pytest.mark.realdata
def test_real_fibsem_volume(em_data, tmp_path):
    """Real FIB-SEM (the gala example, 50 x 100 x 200, dense neuron labels) through the tiny test
    package: blockwise prediction equals the one-shot Predictor, blockwise segmentation is within
    VI 0.05 of the one-shot one, and blockwise scores against the labels equal one-shot scores."""
    from neuroadda_rt import segment, variation_of_information
    from neuroadda_rt.deploy import evaluate_volume, segment_volume
    src = em_data / "drosophila_fibsem_gala_example" / "tests" / "example-data"
    image, gt = f"{src / 'test-image.h5'}:stack", open_volume(f"{src / 'test-gt.lzf.h5'}:stack")[...]
    pkg = neuroadda_rt.load_model(TINY)
    ref = Predictor(pkg, backend="onnxruntime", tile=64).predict(open_volume(image))
    predict_volume(pkg, image, tmp_path / "p.zarr", block_shape=(16, 64, 64), halo=64, dtype="float32", **KW)
    probs = open_volume(tmp_path / "p.zarr")[...]
    assert np.abs(probs - ref).max() <= 1e-4
    one = segment(ref[0], "boundary", threshold=0.5)
    segment_volume(tmp_path / "p.zarr", tmp_path / "s.zarr", block_shape=(16, 64, 64), **KW)
    seg = open_volume(tmp_path / "s.zarr")[...]
    split, merge = variation_of_information(seg, one, ignore_gt=())
    assert split + merge <= 0.05
    e = evaluate_volume(tmp_path / "s.zarr", gt, block_shape=(7, 40, 64))
    assert (e["vi_split"], e["vi_merge"]) == variation_of_information(seg, gt)


def test_outputs_validate_as_ome_ngff(tmp_path, net2, vol):
    """The probability and label images pass an independent OME-NGFF 0.4 validator (ome-zarr-models)."""
    pytest.importorskip("ome_zarr_models", reason="ome-zarr-models (the [test] extra) validates OME-NGFF metadata")
    import zarr
    from ome_zarr_models.v04.image import Image
    from neuroadda_rt.deploy import segment_volume
    predict_volume(net2, vol[:2], tmp_path / "p.zarr", block_shape=(2, 100, 130), halo=32, **KW)
    segment_volume(tmp_path / "p.zarr", tmp_path / "s.zarr", **KW)
    for name, axes in (("p.zarr", ["c", "z", "y", "x"]), ("s.zarr", ["z", "y", "x"])):
        img = Image.from_zarr(zarr.open_group(str(tmp_path / name), mode="r"))
        assert [a.name for a in img.attributes.multiscales[0].axes] == axes
