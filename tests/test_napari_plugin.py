"""The napari plugin: npe2 manifest, readers for every volume format and for the annotation hand-off (tiles in
context, pre-filled labels), the writer that puts proofread labels where `finetune` reads them, and the dock
widget (rank + select, shown in place), headless.

The readers and the writer import neither napari nor Qt, so their tests run without them. The viewer tests use
napari's own ``make_napari_viewer`` fixture under ``QT_QPA_PLATFORM=offscreen``; the canvas needs an OpenGL
context, which the offscreen platform takes from an X display: an Xvfb server is started for the module when no
display is set and ``Xvfb`` exists (``.ci/run`` installs it), else those tests skip with the reason.
Screenshots go to ``docs/figures/`` when ``NEUROADDA_WRITE_FIGURES=1`` (how the README's were made), else to a
temporary folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neuroadda_rt.errors import DTypeError, FormatError, InputValueError, ShapeError

pytest.importorskip("torch", reason="selection and pre-filled labels run the source model (torch extra)")
pytest.importorskip("tifffile", reason="the hand-off is TIFF (io extra)")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "assets" / "tiny_model"
FIGURES = ROOT / "docs" / "figures"
HAVE_NAPARI = all(importlib.util.find_spec(m) is not None for m in ("napari", "npe2", "pytestqt", "qtpy"))


def _start_xvfb() -> str | None:
    """A display for the OpenGL canvas: the current one, or a fresh Xvfb; None when there is one, else why not.

    The Xvfb is stopped by a watchdog shell that waits for this process to exit: killing it from this process
    (atexit) would break Qt's X connection during interpreter shutdown ('X connection broken', exit status 1).
    """
    if os.environ.get("DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        return "no X display and no Xvfb for napari's OpenGL canvas (apt-get install xvfb)"
    for n in range(90, 130):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            break
    watchdog = (f"Xvfb :{n} -screen 0 1600x1000x24 -nolisten tcp & x=$!; "
                f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 0.5; done; kill $x")
    subprocess.run(["sh", "-c", f"( {watchdog} ) >/dev/null 2>&1 &"], check=True)  # returns at once
    for _ in range(200):
        if Path(f"/tmp/.X11-unix/X{n}").exists():
            os.environ["DISPLAY"] = f":{n}"
            return None
        time.sleep(0.05)
    return f"Xvfb :{n} did not start"


NO_GL = None
if HAVE_NAPARI:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists
    NO_GL = _start_xvfb()
needs_napari = pytest.mark.skipif(not HAVE_NAPARI, reason="napari, npe2, pytest-qt or qtpy not installed "
                                                          "(pip install 'neuroadda_rt[napari]' pytest-qt)")
needs_viewer = [needs_napari, pytest.mark.skipif(NO_GL is not None, reason=str(NO_GL)),
                # napari's own start-up warnings (Qt5 theme detection, XDG_RUNTIME_DIR), not ours
                pytest.mark.filterwarnings("ignore::UserWarning"),
                pytest.mark.filterwarnings("ignore::DeprecationWarning"),
                pytest.mark.filterwarnings("ignore::FutureWarning")]


FIGURE_MODE = os.environ.get("NEUROADDA_WRITE_FIGURES") == "1"


def _source_model() -> Path:
    """The source model of the hand-off: the tiny test asset (fast); for the README's figures, a trained bundled
    package, so that the pre-filled labels look like what a lab would proofread."""
    if FIGURE_MODE:
        from neuroadda_rt.package import synthetic_zoo

        zoo = synthetic_zoo(allow_empty=True)
        if len(zoo):
            return zoo.paths[0]
    return TINY


def _screenshot(viewer, path: Path) -> np.ndarray:
    """The whole window at a readable size, view fitted to the data."""
    from PIL import Image

    viewer.window._qt_window.resize(1500, 900)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=False)
    Image.fromarray(shot).save(path)
    return shot


def _figure_path(tmp_path: Path, name: str) -> Path:
    if FIGURE_MODE:
        FIGURES.mkdir(parents=True, exist_ok=True)
        return FIGURES / name
    return tmp_path / name


# --------------------------------------------------------------------------------------------
# fixtures: a target volume, a hand-off written by `select`
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from neuroadda_rt.io import write_volume
    from neuroadda_rt.study.synthetic import make_domain

    image, labels = make_domain(None, (3, 192, 192), seed=4)[:2]
    d = tmp_path_factory.mktemp("target")
    write_volume(d / "vol.h5:raw", image, voxel_size_nm=(40, 4, 4))
    return {"path": d / "vol.h5", "image": image, "labels": labels, "dir": d}


@pytest.fixture(scope="module")
def handoff(target, tmp_path_factory):
    from neuroadda_rt.cli import main

    out = tmp_path_factory.mktemp("ann") / "annotate"
    rc = main(["select", f"{target['path']}:raw", "--model", str(_source_model()), "-n", "3", "--pool", "12", "--tile-size", "64",
               "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    return out


# --------------------------------------------------------------------------------------------
# readers and writer (no napari needed)
# --------------------------------------------------------------------------------------------
def test_volume_reader_opens_every_format_open_volume_reads(tmp_path, rng):
    from neuroadda_rt.io import write_slices, write_volume
    from neuroadda_rt.napari._reader import get_volume_reader

    a = rng.integers(0, 255, (4, 40, 30)).astype(np.uint8)
    vs = (30.0, 5.0, 5.0)
    paths = {ext: write_volume(tmp_path / f"v{ext}", a, voxel_size_nm=vs) for ext in (".h5", ".zarr", ".n5", ".tif")}
    paths[".npy"] = write_volume(tmp_path / "v.npy", a)
    paths["slices"] = write_slices(tmp_path / "slices", a)
    for kind, p in paths.items():
        reader = get_volume_reader(str(p))
        assert reader is not None, kind
        (data, kwargs, layer_type), = reader(str(p))
        assert layer_type == "image", kind
        np.testing.assert_array_equal(np.asarray(data), a, err_msg=kind)
        if kind in (".h5", ".zarr", ".n5", ".tif"):
            np.testing.assert_allclose(kwargs["scale"], vs, rtol=1e-6, err_msg=kind)
    ids = rng.integers(0, 9, (2, 8, 8)).astype(np.uint64)
    (data, kwargs, layer_type), = get_volume_reader(str(write_volume(tmp_path / "ids.h5", ids)))(str(tmp_path / "ids.h5"))
    assert layer_type == "labels" and np.array_equal(np.asarray(data), ids)
    # OME-Zarr probabilities as predict writes them: channels first, two levels -> multiscale, channel axis
    from neuroadda_rt.io.writers import write_ome_zarr

    probs = rng.random((2, 4, 32, 48)).astype(np.float16)
    write_ome_zarr(tmp_path / "probs.zarr", probs, axes="czyx", voxel_size_nm=vs, levels=2)
    (data, kwargs, layer_type), = get_volume_reader(str(tmp_path / "probs.zarr"))(str(tmp_path / "probs.zarr"))
    assert layer_type == "image" and kwargs["multiscale"] and kwargs["channel_axis"] == 0
    assert kwargs["scale"] == list(vs) and len(data) == 2
    np.testing.assert_array_equal(np.asarray(data[0]), probs)
    np.testing.assert_array_equal(np.asarray(data[1]), probs[..., ::2, ::2])
    (tmp_path / "notes.txt").write_text("not a volume")
    assert get_volume_reader(str(tmp_path / "notes.txt")) is None
    assert get_volume_reader([str(paths[".h5"]), str(paths[".zarr"])]) is None  # one volume per call


def test_annotation_reader_shows_tiles_in_context_with_prefilled_labels(handoff, target):
    import neuroadda_rt as nr
    from neuroadda_rt.napari._reader import get_annotation_reader, get_volume_reader
    from neuroadda_rt.segmentation import segment

    assert get_volume_reader(str(handoff)) is None  # a hand-off is not taken for a folder of slices
    assert get_annotation_reader(str(target["dir"])) is None
    layers = get_annotation_reader(str(handoff))(str(handoff))
    (ctx, ckw, ct), (lab, lkw, lt), (boxes, bkw, bt) = layers
    assert (ct, lt, bt) == ("image", "labels", "shapes")
    meta = json.loads((handoff / "tiles.json").read_text())
    info = lkw["metadata"]["neuroadda_rt_annotation"]
    m, (h, w) = info["margin"], info["tile_shape"]
    assert m == 32 and (h, w) == (64, 64) and ctx.shape == (3, 128, 128) and lab.dtype == np.uint32
    img = target["image"]
    for i, e in enumerate(meta["tiles"]):
        z, y, x = e["coords"]
        # the context, independently: the volume padded with zeros, then the grown box
        padded = np.pad(img[z], m)
        np.testing.assert_array_equal(ctx[i], padded[y:y + h + 2 * m, x:x + w + 2 * m])
        assert np.array_equal(boxes[i][:, 1:].min(0), [m, m]) and np.array_equal(boxes[i][:, 1:].max(0), [m + h, m + w])
        # labels: only inside the tile box, and the source model's segmentation of the context, cropped
        assert lab[i][:m].max() == 0 and lab[i][:, :m].max() == 0 and (lab[i][m:m + h, m:m + w] > 0).all()
        probs = nr.Predictor(nr.load_model(_source_model()), device="cpu").predict(ctx[i])
        ref = segment(probs[0], "boundary")[m:m + h, m:m + w]
        got = lab[i][m:m + h, m:m + w]
        pairs = set(zip(ref.ravel().tolist(), got.ravel().tolist()))
        assert len(pairs) == len(np.unique(ref)) == len(np.unique(got))  # the same partition, ids renamed
    all_ids = [set(np.unique(lab[i][lab[i] > 0]).tolist()) for i in range(3)]
    assert not (all_ids[0] & all_ids[1]) and not (all_ids[1] & all_ids[2])  # unique over the stack


def test_handoff_round_trip_paint_save_finetune(handoff, tmp_path):
    from neuroadda_rt.cli import main
    from neuroadda_rt.napari._reader import read_annotation_layers
    from neuroadda_rt.napari._writer import write_annotation_labels
    from neuroadda_rt.workflow import read_annotation

    ann = tmp_path / "ann"
    shutil.copytree(handoff, ann)
    (_, _, _), (lab, lkw, _), _ = read_annotation_layers(ann, prefill=False)
    assert lab.max() == 0 and lkw["name"].endswith("(empty)")
    m = lkw["metadata"]["neuroadda_rt_annotation"]["margin"]
    painted = np.zeros_like(lab)
    painted[:, m:m + 32, m:m + 64] = 7
    painted[:, m + 34:m + 64, m:m + 64] = 3_000_000_000  # ids beyond int32 survive
    painted[:, :m] = 5  # paint outside the tile box: not saved
    written = write_annotation_labels(str(ann), painted, {"metadata": lkw["metadata"]})
    assert len(written) == 3 and all(Path(p).parent == ann / "labels" for p in written)
    images, labels, _ = read_annotation(ann)
    assert labels.dtype == np.uint32 and labels.shape == images.shape == (3, 64, 64)
    np.testing.assert_array_equal(labels, painted[:, m:m + 64, m:m + 64])
    # reopened: the painted labels, not a new prediction
    (_, _, _), (lab2, lkw2, _), _ = read_annotation_layers(ann)
    assert lkw2["name"].endswith("(painted)") and np.array_equal(lab2[:, m:m + 64, m:m + 64], labels)
    rc = main(["finetune", str(ann), "--model", str(TINY), "--out", str(tmp_path / "tuned"), "--steps", "2", "--batch-size", "2",
               "--no-progress", "--json"])
    assert rc == 0 and (tmp_path / "tuned" / "model.json").is_file()


def test_writer_refuses_bad_labels_and_writes_nothing(handoff, tmp_path):
    from neuroadda_rt.napari._writer import write_annotation_labels

    ann = tmp_path / "ann"
    shutil.copytree(handoff, ann)
    good = np.zeros((3, 64, 64), np.uint32)
    with pytest.raises(ShapeError, match="3 label planes"):
        write_annotation_labels(str(ann), good[:2])
    with pytest.raises(InputValueError, match="non-negative"):
        write_annotation_labels(str(ann), good.astype(np.int32) - 1)
    with pytest.raises(DTypeError, match="integer"):
        write_annotation_labels(str(ann), good + 0.5)
    with pytest.raises(FormatError, match="annotation hand-off"):
        write_annotation_labels(str(tmp_path), good)
    with pytest.raises(FormatError, match="nothing was painted"):  # what finetune refuses is refused here
        write_annotation_labels(str(ann), good)
    assert list((ann / "labels").iterdir()) == [] and sorted(p.name for p in ann.iterdir() if p.name.startswith("."))\
        == []
    # the tiles alone (tiles.tif's shape, no context) into the labels/ folder also works
    good[:, :, 32:] = 2
    assert len(write_annotation_labels(str(ann / "labels"), good)) == 3


# --------------------------------------------------------------------------------------------
# napari itself
# --------------------------------------------------------------------------------------------
@needs_napari
def test_manifest_validates_with_npe2():
    from npe2 import PluginManifest

    from neuroadda_rt.napari import MANIFEST

    res = subprocess.run([sys.executable, "-m", "npe2", "validate", str(MANIFEST)], capture_output=True, text=True)
    assert res.returncode == 0 and "valid" in res.stdout, res.stdout + res.stderr
    mf = PluginManifest.from_file(MANIFEST)
    # every command resolves to a callable of the package
    for cmd in mf.contributions.commands:
        mod, _, attr = cmd.python_name.partition(":")
        assert callable(getattr(__import__(mod, fromlist=[attr]), attr)), cmd.python_name
    # the entry point napari discovers it by
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["napari.manifest"]
    assert eps == {"neuroadda-rt": "neuroadda_rt.napari:napari.yaml"}


def _register_plugin():
    """Register the manifest with napari's plugin manager when the package is not pip-installed (the entry
    point then does it)."""
    from npe2 import PluginManager, PluginManifest

    from neuroadda_rt.napari import MANIFEST

    pm = PluginManager.instance()
    if "neuroadda-rt" not in pm._manifests:
        pm.register(PluginManifest.from_file(MANIFEST))


def viewer_test(fn):
    """Marks of a test that opens a napari viewer (skips without napari or an X display for OpenGL)."""
    for mark in reversed(needs_viewer):
        fn = mark(fn)
    return fn


if not HAVE_NAPARI:
    @pytest.fixture
    def make_napari_viewer():  # napari's fixture, absent without napari: the tests skip before using it
        pytest.skip("napari not installed")


@pytest.mark.realdata
@viewer_test
def test_napari_opens_a_shared_em_volume(make_napari_viewer, em_data):
    _register_plugin()
    viewer = make_napari_viewer()
    path = em_data / "drosophila_fibsem_gala_example/tests/example-data/train-image.h5"
    layers = viewer.open(str(path), plugin="neuroadda-rt")
    assert len(layers) == 1 and layers[0].data.shape == (50, 100, 200)
    import h5py

    with h5py.File(path) as f:
        np.testing.assert_array_equal(np.asarray(layers[0].data[10]), f["stack"][10])
    isbi = viewer.open(str(em_data / "isbi2012_drosophila_l1_vnc/data/membrane/train/image"), plugin="neuroadda-rt")
    assert isbi[0].data.shape == (30, 512, 512)


@viewer_test
def test_annotation_opens_for_proofreading_and_saves_back(make_napari_viewer, handoff, tmp_path):
    from neuroadda_rt.workflow import read_annotation

    _register_plugin()
    ann = tmp_path / "ann"
    shutil.copytree(handoff, ann)
    viewer = make_napari_viewer()
    layers = viewer.open(str(ann), plugin="neuroadda-rt")
    kinds = sorted(type(ly).__name__ for ly in layers)
    assert kinds == ["Image", "Labels", "Shapes"]
    lab = next(ly for ly in layers if type(ly).__name__ == "Labels")
    m = lab.metadata["neuroadda_rt_annotation"]["margin"]
    # show the tile whose pre-filled labels have the most segments
    viewer.dims.current_step = (int(np.argmax([len(np.unique(p)) for p in np.asarray(lab.data)])), 0, 0)
    _screenshot(viewer, _figure_path(tmp_path, "napari_annotation.png"))
    # proofread: paint one segment, as a brush stroke would
    lab.data[1, m + 10:m + 20, m + 10:m + 20] = 999
    lab.save(str(ann), plugin="neuroadda-rt")
    _, labels, _ = read_annotation(ann)
    assert labels.dtype == np.uint32 and (labels[1, 10:20, 10:20] == 999).all()
    np.testing.assert_array_equal(labels, np.asarray(lab.data)[:, m:m + 64, m:m + 64])


@viewer_test
def test_dock_widget_ranks_selects_and_outlines_tiles(make_napari_viewer, target, tmp_path):
    import neuroadda_rt as nr
    from neuroadda_rt.io import intensity_rule
    from neuroadda_rt.napari._widget import RankSelectWidget

    _register_plugin()
    zoo = tmp_path / "zoo"
    from neuroadda_rt.package import synthetic_zoo

    if FIGURE_MODE and len(synthetic_zoo(allow_empty=True)):
        zoo = synthetic_zoo().root  # the README's figure: the bundled (synthetic-domain) zoo
    else:
        nr.load_model(TINY).save(zoo / "tiny")
        nr.save_model(nr.load_model(TINY), zoo / "tiny_percentile", normalization=intensity_rule("percentile"),
                      name="tiny-percentile")
    n_sources = len(nr.Zoo(zoo))
    viewer = make_napari_viewer()
    viewer.open(str(target["path"]), plugin="neuroadda-rt")  # its one dataset
    widget = RankSelectWidget(viewer)
    viewer.window.add_dock_widget(widget, name="neuroadda_rt", area="right")
    assert widget.layer_combo.currentText() == "vol.h5"
    widget.zoo_edit.setText(str(zoo))
    widget.tile_spin.setValue(64)
    widget.ntiles_spin.setValue(16)
    widget.pool_spin.setValue(24)
    widget.n_spin.setValue(3)
    widget.rank_button.click()
    assert widget.table.rowCount() == n_sources, widget.status.text()
    assert [widget.table.item(r, 0).text() for r in range(n_sources)] == [e.name for e in widget.ranking]
    widget.select_button.click()
    sel = widget.selection
    assert sel is not None and len(sel) == 3, widget.status.text()
    chosen = viewer.layers["selected tiles"]
    pool = viewer.layers["candidate pool"]
    assert len(chosen.data) == 3 and len(pool.data) == 24
    # the outlines sit on the chosen tiles, in the image's voxel coordinates
    for box, c in zip(chosen.data, sel.coords):
        assert np.array_equal(box.min(0), c) and np.array_equal(box.max(0), [c[0], c[1] + 64, c[2] + 64])
    np.testing.assert_allclose(chosen.scale, viewer.layers["vol.h5"].scale)
    shot = _screenshot(viewer, _figure_path(tmp_path, "napari_rank_select.png"))
    assert shot.shape[0] > 300 and shot.std() > 10
    # an OME-Zarr of probabilities (channels first, two levels) opens as one multiscale layer per channel
    from neuroadda_rt.io.writers import write_ome_zarr

    probs = np.random.default_rng(0).random((2, 3, 192, 192)).astype(np.float16)
    write_ome_zarr(tmp_path / "probs.zarr", probs, axes="czyx", voxel_size_nm=(40, 4, 4), levels=2)
    players = viewer.open(str(tmp_path / "probs.zarr"), plugin="neuroadda-rt")
    assert len(players) == 2 and all(ly.multiscale for ly in players)
    np.testing.assert_array_equal(np.asarray(players[1].data[0]), probs[1])
    widget.out_edit.setText(str(tmp_path / "handoff"))
    widget.write_button.click()
    assert (tmp_path / "handoff" / "tiles.json").is_file(), widget.status.text()
    meta = json.loads((tmp_path / "handoff" / "tiles.json").read_text())
    assert [t["coords"] for t in meta["tiles"]] == sel.coords.tolist()
