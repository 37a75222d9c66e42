"""Model packages: round trip, checksums (tampered / truncated / missing files named), atomic
save, no pickle, Zoo listing and filters, the checked-in tiny asset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

import neuroadda_rt  # noqa: E402
from neuroadda_rt.errors import FormatError, InputValueError, IntegrityError  # noqa: E402
from neuroadda_rt.models import UNet  # noqa: E402
from neuroadda_rt.package import FILES, ModelPackage, Zoo, default_zoo, load_model, save_model  # noqa: E402

TINY = Path(__file__).resolve().parent / "assets" / "tiny_model"


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY)


@pytest.fixture
def tiny_copy(tmp_path):
    dst = tmp_path / "tiny"
    shutil.copytree(TINY, dst)
    return dst


def test_tiny_asset_loads_and_is_consistent(tiny):
    assert isinstance(tiny, ModelPackage) and tiny.path == TINY
    assert tiny.name == "tiny" and tiny.representation == "boundary" and tiny.modality == "synthetic-ssTEM"
    assert tiny.config == {"dim": 2, "in_channels": 1, "widths": [4, 8, 16], "head": "boundary"}
    assert tiny.normalization == {"rule": "dtype"}
    assert tiny.reference_features.shape == (32, 16) and tiny.reference_features.dtype == np.float32
    assert not tiny.reference_features.flags.writeable
    assert sum(f.stat().st_size for f in TINY.iterdir()) < 400_000
    # the stored reference features are what the runtime computes from the package's encoder
    meta = tiny.metadata["reference_features"]
    assert meta["pooling"] == "mean" and meta["n_tiles"] == 32
    # the three network files agree: torch weights vs both ONNX files on the same tiles
    x = np.random.default_rng(0).random((3, 40, 44), dtype=np.float32)
    net = tiny.unet()
    with torch.no_grad():
        ref_z = net.encode(torch.from_numpy(x)[:, None]).numpy().mean(axis=(2, 3))
        ref_p = net(torch.from_numpy(x)[:, None]).numpy()
    f = neuroadda_rt.FeatureExtractor(tiny, backend="onnxruntime", device="cpu", threads=1).features(x)
    p = neuroadda_rt.Predictor(tiny, backend="onnxruntime", device="cpu", tile=64, threads=1).predict_tiles(x)
    assert np.abs(f - ref_z).max() <= 1e-4 and np.abs(p - ref_p).max() <= 1e-4


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    net = UNet(widths=(2, 4), head="affinities").eval()
    tiles = np.random.default_rng(1).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    pkg = save_model(net, tmp_path / "m", organism="mouse", tissue="cortex", modality="ssTEM",
                     voxel_size_nm=(40, 4, 4), training={"data": "toy", "n_samples": 6},
                     metrics={"vi": 1.5}, reference_tiles=tiles, pooling="mean+std")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(("model.json", *FILES))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left behind
    again = load_model(tmp_path / "m")
    assert again.metadata == pkg.metadata and again.sha256 == pkg.sha256
    m = again.metadata
    for key in ("name", "organism", "tissue", "modality", "voxel_size_nm", "representation", "normalization",
                "network", "training", "metrics", "neuroadda_rt_version", "files"):
        assert key in m, key
    assert m["representation"] == "affinities" and m["voxel_size_nm"] == [40.0, 4.0, 4.0]
    assert m["training"]["n_samples"] == 6 and m["metrics"] == {"vi": 1.5}
    assert again.reference_features.shape == (6, 8) and again.pooling == "mean+std"
    # reference features = the runtime's features of the reference tiles
    fx = neuroadda_rt.FeatureExtractor(again, backend="torch", device="cpu", pooling="mean+std")
    assert np.abs(fx.features(tiles) - again.reference_features).max() <= 1e-4
    # weights round-trip exactly
    net2 = again.unet()
    for (k, a), (k2, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # re-saving a package keeps its metadata, a keyword overrides one field
    third = save_model(again, tmp_path / "m3", name="renamed")
    assert third.name == "renamed" and third.organism == "mouse"
    np.testing.assert_array_equal(third.reference_features, again.reference_features)
    copy = again.save(tmp_path / "copy")
    assert copy.sha256 == again.sha256


@pytest.mark.parametrize("victim", ["weights.safetensors", "encoder.onnx", "model.onnx", "reference_features.npy"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_tampered_or_truncated_file_is_named(tiny_copy, victim, damage):
    f = tiny_copy / victim
    data = f.read_bytes()
    if damage == "flip":
        f.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    else:
        f.unlink()
    with pytest.raises(IntegrityError, match=victim):
        load_model(tiny_copy)


def test_broken_model_json(tiny_copy):
    mj = tiny_copy / "model.json"
    text = mj.read_text()
    mj.write_text(text[: len(text) // 2])
    with pytest.raises(IntegrityError, match="model.json"):
        load_model(tiny_copy)
    meta = json.loads(text)
    del meta["files"]["model.onnx"]
    mj.write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="model.onnx"):
        load_model(tiny_copy)
    meta["format"] = "something/else"
    mj.write_text(json.dumps(meta))
    with pytest.raises(FormatError):
        load_model(tiny_copy)
    mj.unlink()
    with pytest.raises(IntegrityError, match="model.json"):
        load_model(tiny_copy)
    with pytest.raises(FormatError):
        load_model(tiny_copy / "nope")


def test_pickled_reference_features_refused(tiny_copy):
    """An object array (needs pickle) with a matching checksum still does not load."""
    f = tiny_copy / "reference_features.npy"
    np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    meta = json.loads((tiny_copy / "model.json").read_text())
    from neuroadda_rt._digest import file_sha256

    meta["files"]["reference_features.npy"] = file_sha256(f)
    (tiny_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="reference_features.npy"):
        load_model(tiny_copy)


def test_save_is_atomic_on_failure(tmp_path, tiny):
    net = tiny.unet()
    with pytest.raises(InputValueError):  # wrong feature width: fails after files were written
        save_model(net, tmp_path / "bad", reference_features=np.zeros((4, 3), np.float32))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputValueError):
        save_model(net, tmp_path / "bad")  # neither reference_features nor reference_tiles
    assert list(tmp_path.iterdir()) == []
    save_model(tiny, tmp_path / "ok")
    with pytest.raises(FileExistsError):
        save_model(tiny, tmp_path / "ok")
    save_model(tiny, tmp_path / "ok", overwrite=True, name="v2")
    assert load_model(tmp_path / "ok").name == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
    with pytest.raises(InputValueError):
        save_model("not a model", tmp_path / "x")


def test_zoo_filters_and_iteration(tmp_path, tiny):
    specs = [("a", "mouse", "ssTEM"), ("b", "fly", "FIB-SEM"), ("c", "mouse", "FIB-SEM")]
    for name, org, mod in specs:
        save_model(tiny, tmp_path / name, name=name, organism=org, modality=mod)
    (tmp_path / "not_a_package").mkdir()
    zoo = Zoo(tmp_path)
    assert len(zoo) == 3 and zoo.names == ["a", "b", "c"]
    assert [p.name for p in zoo.filter(organism="MOUSE")] == ["a", "c"]
    assert [p.name for p in zoo.filter(organism="mouse", modality="fib-sem")] == ["c"]
    assert len(zoo.filter(representation="affinities")) == 0
    pkgs = list(zoo)
    assert all(isinstance(p, ModelPackage) and p.path.parent == tmp_path for p in pkgs)
    assert zoo["b"].organism == "fly"
    with pytest.raises(KeyError):
        zoo["zzz"]
    assert zoo.verify() == {"a": None, "b": None, "c": None}
    (tmp_path / "b" / "model.onnx").write_bytes(b"junk")
    assert "model.onnx" in zoo.verify()["b"]
    with pytest.raises(IntegrityError, match="model.onnx"):
        list(zoo)
    with pytest.raises(FormatError):
        Zoo(tmp_path / "missing")


def test_default_zoo_empty_is_clear():
    zoo = default_zoo(allow_empty=True)
    assert isinstance(zoo, Zoo)
    if len(zoo) == 0:
        with pytest.raises(FormatError, match="zoo build"):
            default_zoo()
    else:
        assert all(isinstance(p, ModelPackage) for p in zoo)


# --------------------------------------------------------------------------------------------
# issue 19: model.json schema and its own checksum, links out of a package, deep JSON
# --------------------------------------------------------------------------------------------
def _edit_json(pkg_dir: Path, edit) -> None:
    mj = pkg_dir / "model.json"
    meta = json.loads(mj.read_text())
    edit(meta)
    mj.write_text(json.dumps(meta, indent=2))


@pytest.mark.parametrize("field,edit", [
    ("network", lambda m: m.__setitem__("network", "unet")),
    ("widths", lambda m: m["network"].__setitem__("widths", [])),
    ("widths", lambda m: m["network"].__setitem__("widths", [4, 8, 1e12])),
    ("widths", lambda m: m["network"].__setitem__("widths", [4, 8, 10**12])),
    ("widths", lambda m: m["network"].__setitem__("widths", [4, True, 16])),
    ("dim", lambda m: m["network"].__setitem__("dim", 4)),
    ("normalization", lambda m: m.__setitem__("normalization", ["dtype"])),
    ("normalization", lambda m: m.__setitem__("normalization", {"rule": "zscore"})),
    ("normalization", lambda m: m.__setitem__("normalization", {"rule": "fixed", "low": 5, "high": 1})),
    ("representation", lambda m: m.__setitem__("representation", "rgb")),
    ("representation", lambda m: m.__setitem__("representation", "affinities")),  # not the network's head
    ("pooling", lambda m: m["reference_features"].__setitem__("pooling", "median")),
    ("voxel_size_nm", lambda m: m.__setitem__("voxel_size_nm", [40, -4, 4])),
    ("name", lambda m: m.__setitem__("name", 7)),
    ("files.encoder.onnx", lambda m: m["files"].__setitem__("encoder.onnx", "abc")),
])
def test_bad_model_json_is_refused_at_load_naming_the_field(tiny_copy, field, edit):
    """Each of these loaded "ok" before and failed only when used, with untyped errors."""
    _edit_json(tiny_copy, edit)
    with pytest.raises(FormatError, match=f"model.json: field .*{field}"):
        load_model(tiny_copy)
    with pytest.raises(FormatError, match=field):
        load_model(tiny_copy, verify=False)
    verdict = Zoo(tiny_copy.parent).verify()[tiny_copy.name]  # what `zoo verify` prints
    assert verdict is not None and field in verdict


def test_reference_features_of_the_wrong_width_for_the_config_are_refused(tiny_copy):
    _edit_json(tiny_copy, lambda m: m["network"].__setitem__("widths", [4, 8, 32]))  # features stay 16 wide
    with pytest.raises(FormatError, match=r"reference_features.npy.*\(n >= 1, 32\).*\(32, 16\)"):
        load_model(tiny_copy)


def test_model_json_edit_is_detected_by_its_own_checksum(tmp_path, tiny):
    pkg = save_model(tiny, tmp_path / "m", organism="mouse")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert "metadata_sha256" in meta and pkg.metadata["metadata_sha256"] == meta["metadata_sha256"]
    # a valid-looking edit of a descriptive field: the schema accepts it, the checksum does not
    _edit_json(tmp_path / "m", lambda m: m.__setitem__("organism", "rat"))
    with pytest.raises(IntegrityError, match=r"model.json.*modified"):
        load_model(tmp_path / "m")
    assert "model.json" in Zoo(tmp_path).verify()["m"]
    # the content is what is checksummed: re-indenting and reordering keys keeps it valid
    (tmp_path / "m" / "model.json").write_text(json.dumps(dict(reversed(list(meta.items())))))
    assert load_model(tmp_path / "m").organism == "mouse"
    # a re-saved or copied package carries a checksum that matches its new content
    assert save_model(pkg, tmp_path / "m2", organism="fly").metadata["metadata_sha256"] != meta["metadata_sha256"]
    assert load_model(pkg.save(tmp_path / "m3").path).organism == "mouse"


def test_format1_package_without_metadata_checksum_loads_with_a_note(tiny_copy, caplog):
    assert "metadata_sha256" not in json.loads((tiny_copy / "model.json").read_text())
    with caplog.at_level("INFO", logger="neuroadda_rt"):
        assert load_model(tiny_copy).name == "tiny"
    assert any("metadata_sha256" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("victim", ["encoder.onnx", "reference_features.npy", "model.json"])
def test_link_out_of_the_package_is_refused_not_followed(tiny_copy, tmp_path, victim):
    """An outside file with the very bytes the checksum expects is still refused, and never hashed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / victim).write_bytes((tiny_copy / victim).read_bytes())
    (tiny_copy / victim).unlink()
    (tiny_copy / victim).symlink_to(outside / victim)
    with pytest.raises(IntegrityError, match=rf"{victim}: a symbolic link to .*outside the package"):
        load_model(tiny_copy)
    # a different outside file: refused the same way, its hash never printed
    (outside / victim).write_bytes(b"x" * 100)
    from neuroadda_rt._digest import file_sha256

    with pytest.raises(IntegrityError, match="symbolic link") as info:
        load_model(tiny_copy)
    assert file_sha256(outside / victim) not in str(info.value)
    # a link to a folder holding the package's files, through a linked folder, is refused too
    (tiny_copy / victim).unlink()
    (outside / "sub").mkdir()
    (outside / "sub" / victim).write_bytes((TINY / victim).read_bytes())
    (tiny_copy / "sub").symlink_to(outside / "sub")
    (tiny_copy / victim).symlink_to(Path("sub") / victim)
    with pytest.raises(IntegrityError, match="outside the package"):
        load_model(tiny_copy)


def test_link_inside_the_package_is_allowed(tiny_copy):
    (tiny_copy / "store").mkdir()
    (tiny_copy / "encoder.onnx").rename(tiny_copy / "store" / "encoder.onnx")
    (tiny_copy / "encoder.onnx").symlink_to(Path("store") / "encoder.onnx")
    assert load_model(tiny_copy).name == "tiny"


@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 100_000 + "1" + "}" * 100_000,
    '{"name": "x", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}",
])
def test_deeply_nested_model_json_is_a_format_error(tiny_copy, text):
    (tiny_copy / "model.json").write_text(text)
    with pytest.raises(FormatError, match=r"model.json: expected JSON nested at most \d+ levels deep"):
        load_model(tiny_copy)
    with pytest.raises(FormatError, match="nested"):
        Zoo(tiny_copy.parent).summaries()
    assert "nested" in Zoo(tiny_copy.parent).verify()[tiny_copy.name]


def test_huge_model_json_is_refused_before_parsing(tiny_copy):
    meta = json.loads((tiny_copy / "model.json").read_text())
    meta["extra"] = {"pad": "x" * (5 * 1024 * 1024)}
    (tiny_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"model.json: expected a JSON file of at most \d+ bytes"):
        load_model(tiny_copy)


def test_brackets_inside_strings_do_not_count_as_nesting(tiny_copy):
    _edit_json(tiny_copy, lambda m: m.__setitem__("extra", {"note": "[[[{{{" * 1000 + '\\"]'}))
    assert load_model(tiny_copy).metadata["extra"]["note"].startswith("[[[{{{")


# --------------------------------------------------------------------------------------------
# issue 19 item 8: an overwrite killed between its two renames; Zoo skips hidden/temporary folders
# --------------------------------------------------------------------------------------------
class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (every later rename dies too)."""


@pytest.mark.parametrize("next_open", ["load_model", "Zoo", "save_model"])
def test_overwrite_killed_between_renames_is_recovered(tmp_path, tiny, monkeypatch, next_open):
    import os

    save_model(tiny, tmp_path / "m", name="v1")
    real, calls = os.replace, []

    def dying(a, b):
        calls.append(1)
        if len(calls) > 1:  # m -> .m.old.* happened; the new copy never arrives
            raise _Killed
        return real(a, b)

    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(_Killed):
        save_model(tiny, tmp_path / "m", name="v2", overwrite=True)
    monkeypatch.undo()
    # the state a kill leaves: no m, its old copy aside, and (a real kill skips the cleanup) the new one
    shutil.copytree(TINY, tmp_path / ".m.k2j4x.tmp")
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.old.")]
    if next_open == "load_model":
        assert load_model(tmp_path / "m").name == "v1"
    elif next_open == "Zoo":
        zoo = Zoo(tmp_path)
        assert zoo.names == ["v1"] and zoo.paths == [tmp_path / "m"]  # no duplicates, temp folders skipped
        assert zoo.verify() == {"m": None}
    else:
        assert save_model(tiny, tmp_path / "m", name="v3", overwrite=True).name == "v3"
        assert load_model(tmp_path / "m").name == "v3"
    assert not [p for p in tmp_path.iterdir() if ".old." in p.name]


def test_zoo_skips_hidden_and_temporary_folders(tmp_path, tiny):
    save_model(tiny, tmp_path / "a", name="a")
    for junk in (".a.x1y2.tmp", ".a.old.q9", "b.tmp", ".hidden"):
        shutil.copytree(tmp_path / "a", tmp_path / junk)
    zoo = Zoo(tmp_path)
    assert zoo.paths == [tmp_path / "a"] and zoo.names == ["a"] and len(zoo) == 1
    assert list(zoo.verify()) == ["a"]
