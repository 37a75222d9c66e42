"""Dataset manifests: data root resolution, splits, label conventions, errors naming files,
and the five shipped manifests against the shared data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neuroadda_rt import Dataset, FormatError, InputValueError, ShapeError
from neuroadda_rt.io import write_slices, write_volume
from neuroadda_rt.labels import instances_to_boundary

MANIFESTS = Path(__file__).resolve().parents[1] / "examples" / "datasets"


@pytest.fixture
def root(tmp_path, rng):
    img = rng.integers(0, 255, size=(6, 20, 24), dtype=np.uint8)
    lab = np.zeros((6, 20, 24), np.uint32)
    lab[:, :, :10] = 7
    lab[:, :, 12:] = 3
    write_volume(tmp_path / "vol.h5:raw", img)
    write_volume(tmp_path / "gt.h5:seg", lab)
    memb = np.where(instances_to_boundary(lab, per_slice=True), 0, 255).astype(np.uint8)
    write_slices(tmp_path / "memb", memb)
    return tmp_path, img, lab, memb


def _manifest(**kw):
    m = {"name": "toy", "organism": "Mus musculus", "tissue": "cortex", "modality": "SBEM",
         "voxel_size_nm": [30, 8, 8], "image": "vol.h5:raw", "labels": {"path": "gt.h5", "key": "seg"},
         "label_kind": "instances", "splits": {"train": {"z": [0, 4]}, "test": {"z": [4, 6]}}}
    m.update(kw)
    return m


def test_instances_splits_and_metadata(root, tmp_path):
    d, img, lab, _ = root
    (tmp_path / "toy.json").write_text(json.dumps(_manifest()))
    ds = Dataset.from_json(tmp_path / "toy.json", data_root=d)
    assert (ds.name, ds.organism, ds.tissue, ds.modality) == ("toy", "Mus musculus", "cortex", "SBEM")
    assert ds.splits == ["train", "test"] and ds.voxel_size_nm == (30, 8, 8)
    tr = ds.image("train")
    assert tr.shape == (4, 20, 24) and tr.voxel_size_nm == (30, 8, 8)
    np.testing.assert_array_equal(tr[1:3, 5], img[1:3, 5])
    te = ds.labels("test")
    assert te.dtype == np.uint32 and te.shape == (2, 20, 24)
    assert set(np.unique(te)) == {0, 1, 2} and ((te == 0) == (lab[4:] == 0)).all()


def test_membrane_kind_and_env_root(root, monkeypatch):
    d, _, lab, memb = root
    monkeypatch.setenv("NEUROADDA_DATA", str(d))
    ds = Dataset.from_dict(_manifest(labels="memb", label_kind="membrane", membrane_value=0))
    inst = ds.labels("train")
    assert inst.max() == 2 * 4  # two cells per slice, per-slice components
    np.testing.assert_array_equal(ds.membrane("train"), memb[:4] == 0)


def test_errors_name_the_files(root, tmp_path, monkeypatch):
    d, img, _, _ = root
    monkeypatch.delenv("NEUROADDA_DATA", raising=False)
    with pytest.raises(FormatError, match="NEUROADDA_DATA"):
        Dataset.from_dict(_manifest())
    write_volume(d / "short.h5:seg", np.zeros((6, 20, 23), np.uint32))
    ds = Dataset.from_dict(_manifest(labels="short.h5:seg"), data_root=d)
    with pytest.raises(ShapeError, match="short.h5.*expected the image shape"):
        ds.labels("train")
    ds = Dataset.from_dict(_manifest(image="nothere.h5:raw"), data_root=d)
    with pytest.raises(FormatError, match="nothere.h5"):
        ds.image("train")
    with pytest.raises(InputValueError, match="split"):
        Dataset.from_dict(_manifest(), data_root=d).image("val")
    with pytest.raises(FormatError, match="label_kind"):
        Dataset.from_dict(_manifest(label_kind="mystery"), data_root=d)
    with pytest.raises(ShapeError, match="slices"):
        Dataset.from_dict(_manifest(splits={"train": {"z": [0, 60]}}), data_root=d).image("train")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FormatError, match="bad.json"):
        Dataset.from_json(tmp_path / "bad.json", data_root=d)
    with pytest.raises(InputValueError, match="no labels"):
        Dataset.from_dict(_manifest(labels=None, label_kind="none"), data_root=d).labels("train")


def test_shipped_manifests_are_relative_and_complete():
    files = sorted(MANIFESTS.glob("*.json"))
    assert len(files) == 5
    for f in files:
        m = json.loads(f.read_text())
        for k in ("name", "organism", "tissue", "modality", "voxel_size_nm", "image", "label_kind", "splits"):
            assert k in m, (f.name, k)
        srcs = [m["image"], m.get("labels")] + [s.get(k) for s in m["splits"].values() for k in ("image", "labels")]
        for s in srcs:
            if s is not None:
                p = s if isinstance(s, str) else s["path"]
                assert not Path(p).is_absolute() and ".." not in Path(p).parts


@pytest.mark.realdata
def test_shipped_manifests_open_real_data(em_data):
    for f in sorted(MANIFESTS.glob("*.json")):
        ds = Dataset.from_json(f, data_root=em_data)
        for split in ds.splits:
            img = ds.image(split)
            first = img[0] if img.ndim == 3 else img[...]
            assert first.dtype == np.uint8 and first.std() > 5, (ds.name, split)
            if ds.has_labels(split) and np.prod(img.shape) <= 32 * 1024 * 1024:
                raw = ds.raw_labels(split)
                assert raw.shape == img.shape
    isbi = Dataset.from_json(MANIFESTS / "isbi2012.json", data_root=em_data)
    lab = isbi.labels("test")
    assert lab.shape == (6, 512, 512) and 0.1 < (lab == 0).mean() < 0.35 and lab.max() > 300
    gala = Dataset.from_json(MANIFESTS / "gala_fibsem.json", data_root=em_data)
    assert gala.labels("test").shape == gala.image("test").shape == (50, 100, 200)


def test_absolute_manifest_paths_need_no_data_root(root, tmp_path, monkeypatch):
    # Issue 19/15: a data root was required even when every manifest path is absolute.
    d, img, lab, _ = root
    monkeypatch.delenv("NEUROADDA_DATA", raising=False)
    m = _manifest(image=str(d / "vol.h5:raw"), labels={"path": str(d / "gt.h5"), "key": "seg"},
                  splits={"train": {"z": [0, 4]}, "test": {"z": [4, 6], "image": str(d / "vol.h5:raw")}})
    (tmp_path / "abs.json").write_text(json.dumps(m))
    for ds in (Dataset.from_dict(m), Dataset.from_json(tmp_path / "abs.json")):
        assert ds.data_root is None
        np.testing.assert_array_equal(np.asarray(ds.image("test")), img[4:6])
        np.testing.assert_array_equal(ds.labels("train") > 0, lab[:4] > 0)
    # a stale $NEUROADDA_DATA is irrelevant to an all-absolute manifest
    monkeypatch.setenv("NEUROADDA_DATA", str(tmp_path / "gone"))
    np.testing.assert_array_equal(np.asarray(Dataset.from_dict(m).image("train")), img[:4])
    # one relative path (here in a split) still needs the root, and the error says which path
    monkeypatch.delenv("NEUROADDA_DATA", raising=False)
    m["splits"]["test"]["image"] = "vol.h5:raw"
    with pytest.raises(FormatError, match=r"no data root.*vol\.h5:raw"):
        Dataset.from_dict(m)
    assert Dataset.from_dict(m, data_root=d).data_root == d
