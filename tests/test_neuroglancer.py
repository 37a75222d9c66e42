"""The neuroglancer link: a state for raw / probabilities / segmentation served locally, its URL fragment, and the
CORS file server it points at (loopback only)."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.parse
import urllib.request

import numpy as np
import pytest

from neuroadda_rt.errors import FormatError, InputValueError

pytest.importorskip("zarr", reason="zarr volumes need the io extra")


@pytest.fixture
def run_dir(tmp_path, rng):
    from neuroadda_rt.io import write_volume
    from neuroadda_rt.io.writers import write_ome_zarr

    import zarr

    raw = rng.integers(0, 255, (4, 32, 48)).astype(np.uint8)
    # a plain zarr array with the old voxel_size_nm attribute (write_volume now writes OME-Zarr)
    plain = zarr.create_array(str(tmp_path / "raw.zarr"), shape=raw.shape, dtype=raw.dtype, zarr_format=2)
    plain[...] = raw
    plain.attrs["voxel_size_nm"] = [40, 4, 4]
    write_volume(tmp_path / "ome_raw.zarr", raw, voxel_size_nm=(40, 4, 4))
    write_ome_zarr(tmp_path / "out" / "probabilities.zarr", rng.random((1, 4, 32, 48)).astype(np.float16), axes="czyx",
                   voxel_size_nm=(40, 4, 4))
    write_ome_zarr(tmp_path / "out" / "segmentation.zarr", rng.integers(0, 5, (4, 32, 48)).astype(np.uint64),
                   voxel_size_nm=(40, 4, 4))
    write_volume(tmp_path / "raw.h5", raw, voxel_size_nm=(40, 4, 4))
    return tmp_path


def test_state_has_the_three_layers_with_sources_under_the_served_root(run_dir):
    from neuroadda_rt.neuroglancer import neuroglancer_state, neuroglancer_url

    s = neuroglancer_state(run_dir / "raw.zarr", run_dir / "out/probabilities.zarr", run_dir / "out/segmentation.zarr",
                           base_url="http://127.0.0.1:8123")
    assert s["_root"] == str(run_dir.resolve()) and s["_notes"] == []
    by = {ly["name"]: ly for ly in s["layers"]}
    assert [ly["type"] for ly in s["layers"]] == ["image", "image", "segmentation"] and s["layout"] == "4panel"
    # a plain array: named axes and the voxel size in metres through a transform
    raw = by["raw"]["source"]
    assert raw["url"] == "zarr://http://127.0.0.1:8123/raw.zarr"
    assert raw["transform"]["outputDimensions"] == {"z": [40e-9, "m"], "y": [4e-9, "m"], "x": [4e-9, "m"]}
    # OME-Zarr carries its own axes and scales: the bare source
    assert by["probabilities"]["source"] == "zarr://http://127.0.0.1:8123/out/probabilities.zarr"
    assert by["segmentation"]["source"] == "zarr://http://127.0.0.1:8123/out/segmentation.zarr"
    # issue 20: what write_volume writes is OME-Zarr, so neuroglancer reads its axes and scale itself
    s2 = neuroglancer_state(run_dir / "ome_raw.zarr", base_url="http://127.0.0.1:8123")
    assert s2["layers"][0]["source"] == "zarr://http://127.0.0.1:8123/ome_raw.zarr"
    url = neuroglancer_url(s)
    viewer, _, frag = url.partition("#!")
    assert viewer == "https://neuroglancer-demo.appspot.com/"
    back = json.loads(urllib.parse.unquote(frag))
    assert back == {k: v for k, v in s.items() if not k.startswith("_")}


def test_unreadable_formats_are_left_out_with_the_conversion(run_dir):
    from neuroadda_rt.neuroglancer import neuroglancer_link, neuroglancer_state

    s = neuroglancer_state(run_dir / "raw.h5", run_dir / "out/probabilities.zarr")
    assert [ly["name"] for ly in s["layers"]] == ["probabilities"]
    assert len(s["_notes"]) == 1 and "raw.zarr" in s["_notes"][0] and "write_volume" in s["_notes"][0]
    text = neuroglancer_link(run_dir / "raw.h5", run_dir / "out/probabilities.zarr")
    assert "python -m neuroadda_rt.neuroglancer" in text and "left out" in text and "#!" in text
    with pytest.raises(InputValueError):
        neuroglancer_state()
    with pytest.raises(FormatError, match="no such file"):
        neuroglancer_state(run_dir / "missing.zarr")
    with pytest.raises(InputValueError, match="http"):
        neuroglancer_state(run_dir / "raw.zarr", base_url="file:///tmp")


def test_the_served_sources_resolve_with_cors(run_dir):
    from neuroadda_rt.neuroglancer import neuroglancer_state, serve

    server = serve(run_dir, port=0)  # an ephemeral port on 127.0.0.1
    port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        s = neuroglancer_state(run_dir / "raw.zarr", run_dir / "out/probabilities.zarr",
                               run_dir / "out/segmentation.zarr", base_url=f"http://127.0.0.1:{port}")
        shapes = {}
        for layer in s["layers"]:
            src = layer["source"]["url"] if isinstance(layer["source"], dict) else layer["source"]
            http = src.split("://", 1)[1]
            meta = ".zarray" if layer["name"] == "raw" else ".zattrs"
            with urllib.request.urlopen(f"{http}/{meta}", timeout=10) as r:
                assert r.headers["Access-Control-Allow-Origin"] == "*"
                doc = json.loads(r.read())
            if layer["name"] == "raw":
                shapes["raw"] = doc["shape"]
            else:  # the level-0 array the multiscale names
                level = doc["multiscales"][0]["datasets"][0]["path"]
                with urllib.request.urlopen(f"{http}/{level}/.zarray", timeout=10) as r:
                    shapes[layer["name"]] = json.loads(r.read())["shape"]
        assert shapes == {"raw": [4, 32, 48], "probabilities": [1, 4, 32, 48], "segmentation": [4, 32, 48]}
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=5)


def test_report_prints_the_run_view(run_dir):
    from neuroadda_rt._cli.report import _neuroglancer

    (run_dir / "run.json").write_text(json.dumps({"settings": {"target": {"path": str(run_dir / "raw.zarr")}}}))
    for name in ("probabilities", "segmentation"):
        (run_dir / "out" / f"{name}.zarr").rename(run_dir / f"{name}.zarr")
    ng = _neuroglancer(run_dir)
    assert ng["root"] == str(run_dir) and ng["notes"] == []
    assert [ly["name"] for ly in ng["state"]["layers"]] == ["raw", "probabilities", "segmentation"]
    assert ng["url"].startswith("https://neuroglancer-demo.appspot.com/#!") and "python -m neuroadda_rt.neuroglancer" \
        in ng["text"]
    (run_dir / "run.json").write_text(json.dumps({"settings": {"target": {"path": "/nonexistent/raw.h5"}}}))
    for name in ("probabilities", "segmentation"):
        shutil.rmtree(run_dir / f"{name}.zarr")
    assert _neuroglancer(run_dir) is None  # nothing viewable: no line at all


def test_predict_prints_the_view_of_input_and_probabilities(tmp_path, rng, capsys):
    from pathlib import Path

    from neuroadda_rt.cli import main
    from neuroadda_rt.io import write_volume

    tiny = Path(__file__).resolve().parent / "assets" / "tiny_model"
    vol = rng.integers(0, 255, (2, 48, 40)).astype(np.uint8)
    write_volume(tmp_path / "in.zarr", vol, voxel_size_nm=(30, 4, 4))
    common = ["--scheduler", "synchronous", "--no-progress"]
    assert main(["predict", str(tiny), str(tmp_path / "in.zarr"), "--out", str(tmp_path / "p.zarr"), "--json",
                 *common]) == 0
    ng = json.loads(capsys.readouterr().out)["neuroglancer"]
    assert ng["root"] == str(tmp_path.resolve()) and ng["notes"] == []
    state = json.loads(urllib.parse.unquote(ng["url"].partition("#!")[2]))
    assert [(ly["name"], ly["type"]) for ly in state["layers"]] == [("raw", "image"), ("probabilities", "image")]
    assert state["layers"][1]["source"] == "zarr://http://127.0.0.1:8000/p.zarr"  # OME-Zarr: axes from its metadata
    write_volume(f"{tmp_path / 'in.h5'}:raw", vol)
    assert main(["predict", str(tiny), str(tmp_path / "in.h5"), "--key", "raw", "--out", str(tmp_path / "q.zarr"),
                 *common]) == 0
    out = capsys.readouterr().out
    assert "python -m neuroadda_rt.neuroglancer" in out and "left out: raw" in out and "#!" in out
