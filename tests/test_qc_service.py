"""QC folder watcher: complete-file detection, SQLite records, errors that do not stop it,
restart without reprocessing or losing files (and crash consistency of state vs database),
the live watchdog loop, the HTML report and the CLI."""

from __future__ import annotations

import base64
import io
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from neuroadda_rt import FormatError, QCMonitor
from neuroadda_rt.qc import QCService, read_tiles, split_tiles, write_report

pytest.importorskip("watchdog")
pytest.importorskip("safetensors")

ASSETS = Path(__file__).resolve().parent / "assets" / "tiny_model"
# small references in unit tests: the monitor warns that they are too small for its alpha (tested on its own)
pytestmark = pytest.mark.filterwarnings("ignore::neuroadda_rt.qc.QCCalibrationWarning")
_PROJ = np.random.default_rng(3).normal(size=(18, 6)) / 3


def enc(tiles):
    n, h, w = tiles.shape
    b = tiles[:, :h // 4 * 4, :w // 4 * 4].reshape(n, 4, h // 4, 4, w // 4).mean(axis=(2, 4)).reshape(n, 16)
    f = np.concatenate([b - 0.5, tiles.mean((1, 2))[:, None] - 0.5, tiles.std((1, 2))[:, None]], 1)
    return np.tanh(f @ _PROJ).astype(np.float32)


def tiles(rng, n, mean=128.0, size=32):
    return np.clip(rng.normal(mean, 30, size=(n, size, size)), 0, 255).astype(np.uint8)


@pytest.fixture
def setup(tmp_path, rng):
    folder = tmp_path / "acq"
    folder.mkdir()
    ref = tiles(rng, 256)

    def factory():
        return QCMonitor(enc, ref, window=16, alpha=0.02)

    return folder, factory


def write_npy(path: Path, arr):
    np.save(path, arr)
    return path


def test_read_tiles_formats(tmp_path, rng):
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    stack = tiles(rng, 3, size=64)
    np.save(tmp_path / "a.npy", stack)
    tifffile.imwrite(tmp_path / "b.tif", stack, photometric="minisblack")
    Image.fromarray(stack[0]).save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_tiles(tmp_path / "a.npy"), stack)
    np.testing.assert_array_equal(read_tiles(tmp_path / "b.tif"), stack)
    np.testing.assert_array_equal(read_tiles(tmp_path / "c.png"), stack[:1])
    cut = read_tiles(tmp_path / "a.npy", tile_size=32)
    assert cut.shape == (12, 32, 32)
    np.testing.assert_array_equal(cut[1], stack[0, :32, 32:])  # row-major within an image
    np.testing.assert_array_equal(split_tiles(stack, 64), stack)
    assert read_tiles(tmp_path).shape[0] == 3 + 3 + 1  # a folder: every image, natural order
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(FormatError, match="bad.png"):
        read_tiles(tmp_path / "bad.png")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError):
        read_tiles(tmp_path / "obj.npy")  # never unpickled


def test_once_records_everything_and_errors(setup, rng, tmp_path):
    folder, factory = setup
    for i in range(3):
        write_npy(folder / f"t{i:03d}.npy", tiles(rng, 8))
    (folder / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    (folder / ".hidden.npy").write_bytes(b"ignored")
    (folder / "notes.txt").write_text("ignored")
    lines = []
    svc = QCService(folder, factory, enc, settle=0.0, give_up=0.0, echo=lines.append)
    assert svc.db_path == tmp_path / "acq.qc.sqlite"  # beside the folder, not in it
    assert svc.run(once=True) == 4
    con = sqlite3.connect(svc.db_path)
    files = dict(con.execute("SELECT path, status FROM files").fetchall())
    assert files == {"t000.npy": "ok", "t001.npy": "ok", "t002.npy": "ok", "broken.npy": "error"}
    assert con.execute("SELECT COUNT(*) FROM tiles").fetchone()[0] == 24
    assert con.execute("SELECT COUNT(*) FROM windows").fetchone()[0] == 1  # 24 tiles, window 16
    err = con.execute("SELECT error FROM files WHERE status='error'").fetchone()[0]
    assert "broken.npy" in err
    assert any(line.startswith("ERROR") for line in lines)
    assert svc.monitor.n_tiles == 24
    svc.close()


def test_restart_resumes_without_reprocessing_or_losing(setup, rng):
    folder, factory = setup
    data = [tiles(rng, 7) for _ in range(6)]
    for i in range(3):
        write_npy(folder / f"t{i}.npy", data[i])
    svc = QCService(folder, factory, enc, settle=0.0)
    svc.run(once=True)
    svc.close()
    # files that arrive while the watcher is down
    for i in range(3, 6):
        write_npy(folder / f"t{i}.npy", data[i])
    svc2 = QCService(folder, factory, enc, settle=0.0)
    assert svc2.monitor.n_tiles == 21  # state restored, not rebuilt
    assert svc2.run(once=True) == 3  # only the new files
    assert svc2.monitor.n_tiles == 42
    # same windows as one uninterrupted monitor fed the same files in the same order
    ref_mon = factory()
    for d in data:
        ref_mon.update(d)
    got = [(w.index, w.mmd2, w.p_value) for w in svc2.monitor.windows]
    assert got == [(w.index, w.mmd2, w.p_value) for w in ref_mon.windows]
    con = sqlite3.connect(svc2.db_path)
    assert [r[0] for r in con.execute("SELECT seq FROM files ORDER BY seq")] == list(range(1, 7))
    svc2.close()


def test_crash_between_state_and_database_is_consistent(setup, rng):
    folder, factory = setup
    write_npy(folder / "a.npy", tiles(rng, 10))
    svc = QCService(folder, factory, enc, settle=0.0)
    svc.run(once=True)
    b = write_npy(folder / "b.npy", tiles(rng, 10))
    # what a crash after saving the state of file 2 but before committing its rows leaves behind
    svc.monitor.update(read_tiles(b))
    svc._save_state(svc.monitor, 2)
    svc.close()
    svc2 = QCService(folder, factory, enc, settle=0.0)
    assert svc2.monitor.n_tiles == 10  # the previous state, the one matching the database
    assert svc2.run(once=True) == 1  # b.npy processed exactly once
    assert svc2.monitor.n_tiles == 20
    svc2.close()
    # a database whose state files are gone is refused, not silently restarted
    for p in (svc2.state_path, svc2.prev_state_path):
        p.unlink()
    with pytest.raises(FormatError, match="no QC state"):
        QCService(folder, factory, enc)


def test_waits_for_complete_files(setup, rng):
    folder, factory = setup
    svc = QCService(folder, factory, enc, settle=0.3, give_up=30.0)
    arr = tiles(rng, 5)
    path = folder / "slow.npy"
    buf = io.BytesIO()
    np.save(buf, arr)
    raw = buf.getvalue()
    with open(path, "wb") as f:
        f.write(raw[:100])  # half written: header only
        f.flush()
        svc.scan()
        assert svc.step() == 0  # size just seen: not settled
        time.sleep(0.35)
        assert svc.step() == 0  # settled but truncated: decode fails, retried later
        f.write(raw[100:])
    time.sleep(0.35)
    svc.step()  # size changed: settle again
    time.sleep(0.35)
    assert svc.step() == 1
    assert svc.monitor.n_tiles == 5
    con = sqlite3.connect(svc.db_path)
    assert con.execute("SELECT status FROM files").fetchall() == [("ok",)]
    svc.close()


def test_live_watcher_picks_up_new_files(setup, rng):
    folder, factory = setup
    lines = []
    svc = QCService(folder, factory, enc, settle=0.2, echo=lines.append)
    th = threading.Thread(target=svc.run, kwargs={"poll": 0.05, "timeout": 20})
    th.start()
    try:
        time.sleep(0.5)
        tmp = folder / ".incoming.npy"
        np.save(tmp, tiles(rng, 16, mean=128))
        os.replace(tmp, folder / "x1.npy")  # atomic delivery (moved event)
        np.save(folder / "x2.npy", tiles(rng, 16, mean=200))  # direct write (created/modified)
        deadline = time.time() + 15
        while svc.monitor.n_tiles < 32 and time.time() < deadline:
            time.sleep(0.1)
    finally:
        svc.stop()
        th.join()
    assert svc.monitor.n_tiles == 32
    assert any("DRIFT" in s for s in lines)  # the second file is a strong brightness step
    svc.close()


def test_report_html(setup, rng, tmp_path):
    pytest.importorskip("matplotlib")
    folder, factory = setup
    for i in range(4):
        write_npy(folder / f"t{i}.npy", tiles(rng, 16, mean=128 if i < 2 else 190))
    bad = tiles(rng, 4)
    bad[:, :, :] = 5  # dark, flat: flagged
    write_npy(folder / "t9.npy", bad)
    (folder / "zz.npy").write_bytes(b"junk")
    svc = QCService(folder, factory, enc, settle=0.0, give_up=0.0)
    svc.run(once=True)
    svc.close()
    out = write_report(svc.db_path, tmp_path / "r" / "report.html")
    page = out.read_text()
    imgs = re.findall(r"src=.data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(imgs) >= 3  # drift plot, counts plot, gallery thumbnails
    for b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "zz.npy" in page
    assert "Reference examples" in page and "most severe first" in page
    # the gallery is ordered by severity
    sev = [float(x) for x in re.findall(r"severity ([0-9.]+)</figcaption>", page)]
    assert sev == sorted(sev, reverse=True) and len(sev) >= 4
    con = sqlite3.connect(svc.db_path)
    for kind, n in con.execute("SELECT kind, COUNT(*) FROM tiles WHERE flagged=1 GROUP BY kind"):
        assert f"<td>{kind}</td><td>{n}</td>" in page
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope.sqlite", tmp_path / "x.html")


def test_cli_watch_and_report(tmp_path, rng, capsys):
    pytest.importorskip("onnxruntime")
    if not (ASSETS / "encoder.onnx").is_file():
        pytest.skip(f"tiny model asset missing at {ASSETS}")
    from neuroadda_rt.cli import main

    folder = tmp_path / "acq"
    folder.mkdir()
    np.save(tmp_path / "ref.npy", tiles(rng, 64, size=32))
    for i in range(2):
        np.save(folder / f"f{i}.npy", tiles(rng, 8, size=32))
    (folder / "bad.tif").write_bytes(b"II*\x00junk")
    args = ["qc", "watch", str(folder), "--model", str(ASSETS), "--reference", str(tmp_path / "ref.npy"),
            "--window", "8", "--once", "--settle", "0", "--give-up", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "processed 3 files" in out and "ERROR" in out
    db = tmp_path / "acq.qc.sqlite"
    assert main(["qc", "report", "--db", str(db), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    # a second run finds nothing new
    assert main(args) == 0
    assert "processed 0 files" in capsys.readouterr().out
    assert main(["qc", "report", "--db", str(tmp_path / "missing.sqlite")]) == 2


def test_old_module_path_warns_and_aliases():
    import importlib
    import sys

    import neuroadda_rt.qc.service as new

    sys.modules.pop("neuroadda_rt.qc_service", None)
    with pytest.warns(DeprecationWarning, match="neuroadda_rt.qc.service"):
        old = importlib.import_module("neuroadda_rt.qc_service")
    for name in old.__all__:
        assert getattr(old, name) is getattr(new, name)


# ----------------------------------------------------------------------------------------------
# watcher fixes (issue 17): content keys, growing files, renames, one watcher per folder, links


def test_growing_multipage_tiff_is_reread_until_complete(setup, rng):
    """A TIFF written page by page with pauses longer than `settle`: each time it is found grown, only
    its new pages are fed (the old ones are unchanged), so every page is monitored exactly once."""
    tifffile = pytest.importorskip("tifffile")
    folder, factory = setup
    pages = tiles(rng, 5)
    path = folder / "stack.tif"
    svc = QCService(folder, factory, enc, settle=0.0)
    for k in (1, 3, 5):
        tifffile.imwrite(path, pages[:k], photometric="minisblack")
        os.utime(path, (time.time() + k, time.time() + k))  # a later mtime, as a real append gives
        svc.scan()
        svc.step()
        assert svc.monitor.n_tiles == k
    con = sqlite3.connect(svc.db_path)
    assert sorted(r[0] for r in con.execute("SELECT idx FROM tiles WHERE file = 'stack.tif'")) == list(range(5))
    assert con.execute("SELECT n_tiles FROM files WHERE path = 'stack.tif'").fetchone()[0] == 5
    ref = factory()
    ref_rep = ref.update(pages)
    got = [r[0] for r in con.execute("SELECT similarity FROM tiles WHERE file = 'stack.tif' ORDER BY idx")]
    np.testing.assert_allclose(got, ref_rep.similarity, rtol=1e-6)
    svc.close()


def test_overwritten_file_is_processed_again(setup, rng):
    folder, factory = setup
    path = write_npy(folder / "a.npy", tiles(rng, 6))
    svc = QCService(folder, factory, enc, settle=0.0)
    svc.run(once=True)
    assert svc.monitor.n_tiles == 6
    os.utime(path, (time.time() + 5, time.time() + 5))  # touched, same bytes: nothing new
    assert svc.run(once=True) == 1 and svc.monitor.n_tiles == 6
    second = tiles(rng, 4, mean=60)
    np.save(path, second)
    os.utime(path, (time.time() + 10, time.time() + 10))
    svc.run(once=True)
    assert svc.monitor.n_tiles == 10  # the new content is monitored
    con = sqlite3.connect(svc.db_path)
    assert con.execute("SELECT COUNT(*) FROM tiles WHERE file = 'a.npy'").fetchone()[0] == 4
    svc.close()


def test_renamed_file_is_not_counted_twice(setup, rng):
    folder, factory = setup
    path = write_npy(folder / "a.npy", tiles(rng, 6))
    lines = []
    svc = QCService(folder, factory, enc, settle=0.0, echo=lines.append)
    svc.run(once=True)
    os.replace(path, folder / "renamed.npy")
    svc.run(once=True)
    assert svc.monitor.n_tiles == 6
    con = sqlite3.connect(svc.db_path)
    assert con.execute("SELECT status FROM files WHERE path = 'renamed.npy'").fetchone()[0] == "duplicate"
    assert any(s.startswith("duplicate") and "a.npy" in s for s in lines)
    svc.close()


def test_second_watcher_on_the_same_folder_is_refused(setup, rng, tmp_path):
    from neuroadda_rt.qc.service import WatcherLockedError

    folder, factory = setup
    svc = QCService(folder, factory, enc, settle=0.0)
    with pytest.raises(WatcherLockedError, match="already watched"):
        QCService(folder, factory, enc, settle=0.0)
    svc.close()
    assert not svc.lock_path.exists()
    # a lock left by a process that is gone is stale: taken over
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    svc.lock_path.write_text(dead.stdout.strip() + "\n")
    svc2 = QCService(folder, factory, enc, settle=0.0)
    assert svc2.lock_path.read_text().split()[0] == str(os.getpid())
    svc2.close()


def test_links_leading_out_of_the_folder_are_ignored(setup, rng, tmp_path):
    folder, factory = setup
    outside = write_npy(tmp_path / "elsewhere.npy", tiles(rng, 5))
    (folder / "link.npy").symlink_to(outside)
    write_npy(folder / "real.npy", tiles(rng, 3))
    (folder / "inside_link.npy").symlink_to(folder / "real.npy")  # inside the folder: its target is processed
    svc = QCService(folder, factory, enc, settle=0.0)
    svc.run(once=True)
    con = sqlite3.connect(svc.db_path)
    paths = {r[0] for r in con.execute("SELECT path FROM files")}
    assert "link.npy" not in paths and "elsewhere.npy" not in paths
    assert svc.monitor.n_tiles == 3
    svc.close()


def test_console_prints_one_line_per_file(setup, rng):
    folder, factory = setup
    bad = tiles(rng, 8)
    bad[:4] = 0  # four black tiles
    write_npy(folder / "a.npy", bad)
    write_npy(folder / "b.npy", tiles(rng, 8))
    lines = []
    svc = QCService(folder, factory, enc, settle=0.0, echo=lines.append)
    svc.run(once=True)
    per_file = [s for s in lines if s.split()[0] in ("ok", "grown", "rewritten")]
    assert len(per_file) == 2
    assert "4 flagged (black_region 4)" in per_file[0]
    assert "next window 8/16 tiles" in per_file[0] and "window #0" in per_file[1]
    svc.close()


def test_cli_full_network_onnx_says_what_is_wrong(tmp_path, rng, capsys):
    pytest.importorskip("onnx")
    if not (ASSETS / "model.onnx").is_file():
        pytest.skip(f"tiny model asset missing at {ASSETS}")
    from neuroadda_rt.cli import main

    folder = tmp_path / "acq"
    folder.mkdir()
    np.save(tmp_path / "ref.npy", tiles(rng, 64, size=32))
    code = main(["qc", "watch", str(folder), "--model", str(ASSETS / "model.onnx"), "--reference",
                 str(tmp_path / "ref.npy"), "--once"])
    err = capsys.readouterr().err
    assert code == 2
    assert "full network" in err and "1 channels" in err and "--part encoder" in err
    assert "no backend can run" not in err


def test_read_sections_labels_tiles_by_file_and_page(tmp_path, rng):
    tifffile = pytest.importorskip("tifffile")
    from neuroadda_rt.qc.reading import read_sections

    folder = tmp_path / "ref"
    folder.mkdir()
    for i in (2, 10, 1):  # natural order: 1, 2, 10
        np.save(folder / f"s{i}.npy", np.full((1, 64, 64), i, np.uint8))
    t, g = read_sections(folder, tile_size=32)
    assert t.shape == (12, 32, 32)
    np.testing.assert_array_equal(g, np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(t[:, 0, 0], np.repeat([1, 2, 10], 4))
    stack = tiles(rng, 3, size=64)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    t, g = read_sections(tmp_path / "s.tif", tile_size=32)
    np.testing.assert_array_equal(t, split_tiles(stack, 32))
    np.testing.assert_array_equal(g, np.repeat([0, 1, 2], 4))


def test_report_outlines_flagged_tiles_in_their_section(setup, rng, tmp_path):
    """With --tile-size the report shows each section holding flags, its flagged tiles outlined in red
    at the tile's place (split_tiles order)."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    folder, _ = setup
    ref = tiles(rng, 256)
    svc = QCService(folder, lambda: QCMonitor(enc, ref, window=16), enc, settle=0.0, tile_size=32)
    sec = np.concatenate([np.concatenate(list(tiles(rng, 3)), axis=1) for _ in range(2)], axis=0)  # 64 x 96
    sec[32:, 64:] = 0  # tile 5 (row 1, column 2) is black
    np.save(folder / "s.npy", sec[None])
    svc.run(once=True)
    con = sqlite3.connect(svc.db_path)
    (png,) = con.execute("SELECT png FROM overviews WHERE file = 's.npy' AND page = 0").fetchone()
    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (im[..., 0] > 200) & (im[..., 1] < 60) & (im[..., 2] < 60)
    ys, xs = np.nonzero(red)
    assert ys.min() >= 31 and xs.min() >= 63 and ys.max() <= 64 and xs.max() <= 96
    svc.close()
    page = write_report(svc.db_path, tmp_path / "r.html").read_text()
    assert "outlined in red" in page


def test_cli_watch_defaults_to_the_model_reference_tile_size(tmp_path, rng, monkeypatch, capsys):
    # Issue 15: qc needed --tile-size by hand; it now takes a package's reference tile size (64 for the tiny
    # asset), fitted to smaller sections with a note. A .npy reference of cut tiles keeps its tiles.
    import tifffile

    from neuroadda_rt.cli import main

    seen = {}

    class FakeService:
        def __init__(self, folder, factory, model, **kw):
            seen["tile_size"] = kw["tile_size"]
            raise SystemExit(0)

    monkeypatch.setattr("neuroadda_rt.qc.QCService", FakeService)
    (tmp_path / "acq").mkdir()
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(2):
        tifffile.imwrite(ref / f"s{i}.tif", rng.integers(0, 255, (130, 140), dtype=np.uint8))
    with pytest.raises(SystemExit):
        main(["qc", "watch", str(tmp_path / "acq"), "--model", str(ASSETS), "--reference", str(ref)])
    assert seen["tile_size"] == 64
    small = tmp_path / "small"
    small.mkdir()
    tifffile.imwrite(small / "s0.tif", rng.integers(0, 255, (40, 50), dtype=np.uint8))
    with pytest.raises(SystemExit):
        main(["qc", "watch", str(tmp_path / "acq"), "--model", str(ASSETS), "--reference", str(small)])
    assert seen["tile_size"] == 32 and "using 32 px tiles" in capsys.readouterr().err
    np.save(tmp_path / "ref.npy", rng.integers(0, 255, (8, 32, 32), dtype=np.uint8))
    with pytest.raises(SystemExit):
        main(["qc", "watch", str(tmp_path / "acq"), "--model", str(ASSETS), "--reference", str(tmp_path / "ref.npy")])
    assert seen["tile_size"] is None


def test_cli_watch_int8_calibrates_the_encoder_on_the_reference(tmp_path, rng, capsys, monkeypatch):
    """`--precision int8`: the package's encoder is quantised on the reference tiles (as the monitor sees them,
    in [0, 1]) and the stream is scored with it; the scores follow those of an int8 extractor built by hand."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if not (ASSETS / "encoder.onnx").is_file():
        pytest.skip(f"tiny model asset missing at {ASSETS}")
    from neuroadda_rt import FeatureExtractor
    from neuroadda_rt.cli import main
    from neuroadda_rt.qc.descriptors import as_tiles

    monkeypatch.setenv("NEUROADDA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "acq"
    folder.mkdir()
    ref = tiles(rng, 64, size=32)
    np.save(tmp_path / "ref.npy", ref)
    stream = tiles(rng, 8, size=32)
    np.save(folder / "f0.npy", stream)
    args = ["qc", "watch", str(folder), "--model", str(ASSETS), "--reference", str(tmp_path / "ref.npy"),
            "--window", "8", "--once", "--settle", "0", "--give-up", "0", "--precision", "int8"]
    assert main(args) == 0
    assert "processed 1 files" in capsys.readouterr().out
    quantised = list((tmp_path / "cache" / "int8").glob("*.onnx"))
    assert len(quantised) == 1
    fx = FeatureExtractor(ASSETS, precision="int8", calibration_tiles=as_tiles(ref))
    assert list((tmp_path / "cache" / "int8").glob("*.onnx")) == quantised  # the same calibration: reused
    mon = QCMonitor(fx, ref, window=8)
    want = mon.update(stream).similarity
    con = sqlite3.connect(tmp_path / "acq.qc.sqlite")
    got = [r[0] for r in con.execute("SELECT similarity FROM tiles WHERE file = 'f0.npy' ORDER BY idx")]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_short_reference_note_reaches_console_and_report(tmp_path, rng):
    """A reference too short for full-size drift calibration (13 sections of 3 tiles, window 32) is
    calibrated on shorter runs; the watcher prints why and the report says so."""
    pytest.importorskip("matplotlib")
    folder = tmp_path / "acq"
    folder.mkdir()
    ref, groups = tiles(rng, 39), np.repeat(np.arange(13), 3)

    def factory():
        return QCMonitor(enc, ref, window=32, reference_groups=groups)

    lines = []
    write_npy(folder / "a.npy", tiles(rng, 40))
    svc = QCService(folder, factory, enc, settle=0.0, echo=lines.append)
    svc.run(once=True)
    svc.close()
    warn = [s for s in lines if s.startswith("WARNING") and "runs of" in s]
    assert len(warn) == 1 and "conservative" in warn[0]
    page = write_report(svc.db_path, tmp_path / "r.html").read_text()
    assert "Drift threshold calibrated on shorter runs" in page and "Drift not tested" not in page
