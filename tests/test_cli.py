"""The workflow's CLI steps, in-process through ``neuroadda_rt.cli.main`` and once as a subprocess:
rank -> select -> (paint) -> finetune -> evaluate -> export -> report, and the one-line errors (exit
status 2, no traceback) for bad paths, tiles outside the volume and labels that do not match."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
tifffile = pytest.importorskip("tifffile")

import _workflow_zoo as wz  # noqa: E402

from neuroadda_rt.cli import main  # noqa: E402

COMMANDS = ["rank", "select", "finetune", "evaluate", "export", "report", "demo"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return wz.shared_zoo(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A target volume and its labels as TIFF files."""
    d = tmp_path_factory.mktemp("cli_data")
    img, lab = wz.volume(wz.domains()[1], seed=600, shape=(2, 96, 96))
    tifffile.imwrite(d / "target.tif", img, photometric="minisblack")
    tifffile.imwrite(d / "labels.tif", lab, photometric="minisblack")
    return d, img, lab


def run_json(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def error_of(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert cmd in capsys.readouterr().out


def test_workflow_steps(zoo, data, tmp_path, capsys):
    d, img, lab = data
    zoo_dir = str(zoo[0].parent)
    common = ["--tile-size", "32", "--no-progress"]
    r = run_json(capsys, ["rank", str(d / "target.tif"), "--zoo", zoo_dir, "--n-tiles", "16", "--permutations", "20",
                          "--no-cache", "--out", str(tmp_path / "ranking.json"), "--json", *common])
    assert [x["name"] for x in r["ranking"]][0] == "near_b"
    assert json.loads((tmp_path / "ranking.json").read_text())["ranking"][0]["name"] == "near_b"
    # human-readable output too
    assert main(["rank", str(d / "target.tif"), "--zoo", zoo_dir, "--n-tiles", "8", "--permutations", "0",
                 "--no-cache", *common]) == 0
    assert "best: near_b" in capsys.readouterr().out

    ann = tmp_path / "ann"
    s = run_json(capsys, ["select", str(d / "target.tif"), "--model", str(tmp_path / "ranking.json"), "-n", "3",
                          "--pool", "24", "--out", str(ann), "--json", *common])
    assert len(s["coords"]) == 3 and s["strategy"] == "median"
    coords = np.asarray(s["coords"])
    # the annotation folder: images are the target's tiles at the listed coordinates
    names = sorted(p.stem for p in (ann / "images").iterdir())
    for name, (z, y, x) in zip(names, coords):
        assert name.endswith(f"_z{z}_y{y}_x{x}")
        np.testing.assert_array_equal(tifffile.imread(ann / "images" / f"{name}.tif"), img[z, y:y + 32, x:x + 32])

    # finetune refuses missing labels, then trains on the "painted" (oracle) ones
    err = error_of(capsys, ["finetune", str(ann), "--out", str(tmp_path / "ft"), "--steps", "2"])
    assert "no label for tile" in err
    for name, (z, y, x) in zip(names, coords):
        tifffile.imwrite(ann / "labels" / f"{name}.tif", lab[z, y:y + 32, x:x + 32])
    f = run_json(capsys, ["finetune", str(ann), "--out", str(tmp_path / "ft"), "--steps", "2", "--batch-size", "2",
                          "--no-progress", "--json"])
    assert f["tiles"] == 3 and f["mode"] == "finetune" and f["source"].endswith("near_b")
    assert f["device"] == "cpu"  # the Python API's default
    import neuroadda_rt as nr

    ft = nr.load_model(tmp_path / "ft")
    assert ft.metadata["training"]["n_samples"] == 3
    assert ft.metadata["training"]["weight_interpolation"]["mix"] == 0.5  # finetune's default (WiSE-FT)
    plain = run_json(capsys, ["finetune", str(ann), "--out", str(tmp_path / "ft_plain"), "--steps", "2",
                              "--batch-size", "2", "--mix", "1", "--no-progress", "--json"])
    assert plain["train"]["mix"] == 1.0
    assert "weight_interpolation" not in nr.load_model(tmp_path / "ft_plain").metadata["training"]

    # evaluate on volumes and on the annotation folder
    ev = run_json(capsys, ["evaluate", str(tmp_path / "ft"), str(d / "target.tif"), str(d / "labels.tif"),
                           "--n-tiles", "2", "--tile-size", "32", "--no-progress", "--json"])
    assert set(ev["overall"]) >= {"vi_split", "vi_merge", "vi_total", "adapted_rand_error"}
    ev2 = run_json(capsys, ["evaluate", str(tmp_path / "ft"), str(ann), "--no-progress", "--json"])
    assert ev2["n_images"] == 3

    # export the ONNX network and check it runs like the package's own
    ex = run_json(capsys, ["export", str(tmp_path / "ft"), "--format", "onnx", "--part", "encoder",
                           "--out", str(tmp_path / "enc.onnx"), "--json"])
    assert ex["bytes"] > 0
    x = img[:1, :32, :32]
    np.testing.assert_allclose(nr.FeatureExtractor(str(tmp_path / "enc.onnx")).features(x),
                               nr.FeatureExtractor(ft).features(x), atol=1e-4)
    err = error_of(capsys, ["export", str(tmp_path / "ft"), "--format", "int8", "--part", "encoder",
                            "--out", str(tmp_path / "q.onnx")])
    assert "--calibration" in err
    # Issue 19/15: the part has no default, so `--out encoder.int8.onnx` can no longer hold the full network.
    err = error_of(capsys, ["export", str(tmp_path / "ft"), "--format", "onnx", "--out", str(tmp_path / "e.onnx")])
    assert "--part encoder" in err and "--part full" in err and not (tmp_path / "e.onnx").exists()


def test_errors(zoo, data, tmp_path, capsys):
    d, img, lab = data
    zoo_dir = str(zoo[0].parent)
    assert "target volume not found" in error_of(capsys, ["rank", str(tmp_path / "nope.h5"), "--zoo", zoo_dir])
    assert "zoo not found" in error_of(capsys, ["rank", str(d / "target.tif"), "--zoo", str(tmp_path / "nozoo")])
    assert "model not found" in error_of(capsys, ["select", str(d / "target.tif"), "--model", str(tmp_path / "m"),
                                                  "--out", str(tmp_path / "a")])
    (tmp_path / "bad.tif").write_bytes(b"not a tiff at all")
    error_of(capsys, ["rank", str(tmp_path / "bad.tif"), "--zoo", zoo_dir, "--tile-size", "32"])
    # a tile larger than the volume, and hand-given tiles outside it
    assert "at least 500x500" in error_of(capsys, ["rank", str(d / "target.tif"), "--zoo", zoo_dir, "--tile-size", "500",
                                               "--no-cache"])
    (tmp_path / "coords.csv").write_text("z,y,x\n0,10,10\n1,80,80\n")
    err = error_of(capsys, ["select", str(d / "target.tif"), "--model", str(zoo[0]), "--coords",
                            str(tmp_path / "coords.csv"), "--tile-size", "32", "--out", str(tmp_path / "a")])
    assert "tile 1 at (1, 80, 80) of size 32 lies outside the volume of shape (2, 96, 96)" in err
    (tmp_path / "coords.csv").write_text("z,y,x\n0,10,10\n1,60,20\n")
    assert main(["select", str(d / "target.tif"), "--model", str(zoo[0]), "--coords", str(tmp_path / "coords.csv"),
                 "--tile-size", "32", "--out", str(tmp_path / "given")]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "given" / "tiles.tif")[1], img[1, 60:92, 20:52])
    # labels that do not match the selected tiles
    ann = tmp_path / "given"
    tifffile.imwrite(ann / "labels" / "tile_000_z0_y10_x10.tif", lab[0, 10:42, 10:42])
    tifffile.imwrite(ann / "labels" / "tile_001_z1_y60_x20.tif", lab[1, 60:92, 20:50])
    err = error_of(capsys, ["finetune", str(ann), "--model", str(zoo[0]), "--out", str(tmp_path / "ft")])
    assert "label has shape (32, 30), expected (32, 32)" in err
    (ann / "labels" / "tile_001_z1_y60_x20.tif").unlink()
    tifffile.imwrite(ann / "labels" / "tile_001_z1_y61_x20.tif", lab[1, 61:93, 20:52])
    err = error_of(capsys, ["finetune", str(ann), "--model", str(zoo[0]), "--out", str(tmp_path / "ft")])
    assert "does not match any selected tile" in err
    assert "run directory not found" in error_of(capsys, ["report", str(tmp_path / "norun")])
    assert "expected a LABELS volume" in error_of(capsys, ["evaluate", str(zoo[0]), str(d / "target.tif")])


def test_subprocess(zoo, data):
    d, _, _ = data
    cmd = [sys.executable, "-m", "neuroadda_rt", "rank", str(d / "target.tif"), "--zoo", str(zoo[0].parent),
           "--tile-size", "32", "--n-tiles", "8", "--permutations", "10", "--no-cache", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ranking"][0]["name"] == "near_b"
    bad = subprocess.run(cmd[:4] + [str(d / "missing.tif")] + cmd[5:], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("neuroadda-rt rank: error: target volume not found")
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_demo_fast(zoo, tmp_path, capsys):
    """The README's main command on a stand-in zoo: a family.json naming a held-out domain."""
    root = tmp_path / "zoo"
    root.mkdir()
    for p in zoo:
        (root / p.name).symlink_to(p, target_is_directory=True)
    styles = {s.name: s.to_dict() for s in wz.domains()}
    held = wz.domains()[1].replace(name="held", photons=50.0)
    styles["held"] = held.to_dict()
    (root / "family.json").write_text(json.dumps({"styles": styles, "held_out": "held", "demo_seed": 1000,
                                                  "nearest": {"held": "near_b"}}))
    out = run_json(capsys, ["demo", "--zoo", str(root), "--fast", "--steps", "2", "--out", str(tmp_path / "demo"),
                            "--no-progress", "--json"])
    assert out["target_domain"] == "held" and out["best_source"] == "near_b"
    assert out["nearest_relative"] == "near_b"
    assert set(out["vi"]) == {"finetuned", "scratch", "source"}
    from neuroadda_rt import _core

    compiled = bool(_core.built_with_cuda())  # cuda_compiled is the build, cuda_available also needs a GPU now
    assert out["cuda_compiled"] is compiled
    assert out["cuda_available"] is (compiled and _core.cuda_device_count() > 0)
    report = tmp_path / "demo" / "report.html"
    assert out["report"] == str(report) and report.exists()
    run = json.loads((tmp_path / "demo" / "run.json").read_text())
    assert run["settings"]["demo"]["target_domain"] == "held" and run["settings"]["n"] == 4
    assert run["settings"]["strategy"] == "median"
    assert "family.json" in error_of(capsys, ["demo", "--zoo", str(zoo[0].parent.parent / "_base"),
                                              "--out", str(tmp_path / "x")])


# ---- issue 19: every reported error type gives one line, exit status 2, and a clean stdout --------

def _ort(name):
    state = pytest.importorskip("onnxruntime.capi.onnxruntime_pybind11_state")
    return getattr(state, name)


ESCAPED = {  # what escaped the handler before (traceback, exit status 1), as the libraries raise it
    "onnx_invalid_protobuf": (lambda: _ort("InvalidProtobuf")(
        "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from m.onnx failed:Protobuf parsing failed."),
        "INVALID_PROTOBUF"),
    "onnx_fail": (lambda: _ort("Fail")("[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed"), "FAIL"),
    "onnx_no_such_file": (lambda: _ort("NoSuchFile")("[ONNXRuntimeError] : 3 : NO_SUCHFILE : m.onnx"),
                          "NO_SUCHFILE"),
    "onnx_invalid_graph": (lambda: _ort("InvalidGraph")("[ONNXRuntimeError] : 10 : INVALID_GRAPH : bad node"),
                           "INVALID_GRAPH"),
    "recursion": (lambda: RecursionError("maximum recursion depth exceeded while decoding a JSON array"),
                  "RecursionError: maximum recursion depth"),
    "npz_attribute": (lambda: AttributeError("'NpzFile' object has no attribute 'shape'"),
                      "AttributeError: 'NpzFile' object has no attribute 'shape'"),
    "zarr_runtime": (lambda: RuntimeError("error during blosc decompression: -1\n  chunk 0.0.0"),
                     "RuntimeError: error during blosc decompression: -1 chunk 0.0.0"),
    "not_a_directory": (lambda: NotADirectoryError(20, "Not a directory", "out.txt"), "Not a directory: 'out.txt'"),
    "file_exists": (lambda: FileExistsError(17, "File exists", "zoo"), "File exists: 'zoo'"),
    "eof": (lambda: EOFError("Ran out of input"), "EOFError: Ran out of input"),
    "eof_empty": (lambda: EOFError(), "EOFError"),
}


@pytest.mark.parametrize("json_flag", [True, False])
@pytest.mark.parametrize("case", sorted(ESCAPED))
def test_reported_errors_are_one_line_with_status_2(case, json_flag, monkeypatch, capsys):
    import neuroadda_rt._cli.rank as rank_cmd

    make, expected = ESCAPED[case]
    exc = make()

    def failing(args):
        raise exc

    monkeypatch.setattr(rank_cmd, "run", failing)
    capsys.readouterr()
    assert main(["rank", "target.tif", *(["--json"] if json_flag else [])]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # stdout holds only the command's output (valid JSON with --json): nothing here
    assert err.endswith("\n") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("neuroadda-rt rank: error: ") and expected in err, err
    # --debug shows the traceback instead
    with pytest.raises(type(exc)):
        main(["--debug", "rank", "target.tif"])


def test_unlisted_errors_keep_their_traceback(monkeypatch):
    import neuroadda_rt._cli.rank as rank_cmd
    from neuroadda_rt import cli

    assert not issubclass(ZeroDivisionError, cli.REPORTED_ERRORS)  # a bug, not a user error

    def failing(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(rank_cmd, "run", failing)
    with pytest.raises(ZeroDivisionError):
        main(["rank", "target.tif"])
    assert all(isinstance(t, type) and issubclass(t, BaseException) for t in cli.REPORTED_ERRORS)
    assert Exception not in cli.REPORTED_ERRORS and BaseException not in cli.REPORTED_ERRORS


def test_finetune_device(zoo, data, tmp_path, capsys):
    """``finetune --device`` reaches the trainer: cuda on a PyTorch without CUDA is refused by training's own
    check (one line, exit 2), cpu trains, an unknown device is an argparse error."""
    torch = pytest.importorskip("torch")
    d, img, lab = data
    assert main(["select", str(d / "target.tif"), "--model", str(zoo[0]), "-n", "2", "--pool", "8",
                 "--tile-size", "32", "--no-progress", "--out", str(tmp_path / "ann")]) == 0
    ann = tmp_path / "ann"
    for p in sorted((ann / "images").iterdir()):
        z, y, x = (int(part[1:]) for part in p.stem.split("_")[-3:])
        tifffile.imwrite(ann / "labels" / p.name, lab[z, y:y + 32, x:x + 32])
    argv = ["finetune", str(ann), "--out", str(tmp_path / "ft"), "--steps", "1", "--batch-size", "2", "--no-progress",
            "--json"]
    if not torch.cuda.is_available():
        err = error_of(capsys, [*argv, "--device", "cuda"])
        assert "device='cuda' was asked for" in err
        assert not (tmp_path / "ft").exists()
    f = run_json(capsys, [*argv, "--device", "cpu"])
    assert f["device"] == "cpu" and f["tiles"] == 2
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", "tpu"])
    assert exc.value.code == 2


def test_no_command_is_a_usage_error(capsys):
    # Issue 19 audit: a bare `neuroadda-rt` printed help to stdout and exited 1, unlike every other misuse (2)
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "usage: neuroadda-rt" in captured.err and captured.out == ""
    assert [ln for ln in captured.err.splitlines() if "error:" in ln] == [
        "neuroadda-rt: error: expected a COMMAND (try `neuroadda-rt demo`, or --help for the list)"]


def test_select_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # Issue 19/14: `select --out FILE` failed only when writing, with "[Errno 20] Not a directory: .../images"
    import neuroadda_rt._cli.select as cli_select

    monkeypatch.setattr(cli_select, "open_target", lambda *a: pytest.fail("the volume was opened"))
    (tmp_path / "f").write_text("x")
    err = error_of(capsys, ["select", str(tmp_path / "t.npy"), "--model", "m", "-n", "2", "--out", str(tmp_path / "f")])
    assert "expected --out to be a folder" in err and str(tmp_path / "f") in err
