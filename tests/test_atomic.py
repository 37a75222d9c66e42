import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from neuroadda_rt import _atomic


def test_write_json_roundtrip_with_numpy_values(tmp_path):
    out = _atomic.write_json(tmp_path / "sub" / "a.json", {"x": np.float32(1.5), "a": np.arange(3), "p": tmp_path})
    assert json.loads(out.read_text()) == {"x": 1.5, "a": [0, 1, 2], "p": str(tmp_path)}


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with _atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_written_file_has_umask_permissions_not_0600(tmp_path):
    out = _atomic.write_text(tmp_path / "t.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_save_npy_refuses_object_arrays_and_loads_without_pickle(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    np.testing.assert_array_equal(np.load(_atomic.save_npy(tmp_path / "a.npy", a), allow_pickle=False), a)
    with pytest.raises(ValueError):
        _atomic.save_npy(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    assert not (tmp_path / "o.npy").exists()


def test_read_json_source(tmp_path):
    assert _atomic.read_json_source('{"a": 1}', "thing") == '{"a": 1}'
    (tmp_path / "f.json").write_text('{"b": 2}')
    assert json.loads(_atomic.read_json_source(tmp_path / "f.json", "thing")) == {"b": 2}
    with pytest.raises(FileNotFoundError, match="thing file not found"):
        _atomic.read_json_source(tmp_path / "missing.json", "thing")


def test_commit_dir_replaces_by_rename_and_respects_overwrite(tmp_path):
    dest = tmp_path / "pkg"
    first = _atomic.temp_dir_beside(dest)
    (first / "a.txt").write_text("1")
    _atomic.commit_dir(first, dest)
    second = _atomic.temp_dir_beside(dest)
    (second / "b.txt").write_text("2")
    with pytest.raises(FileExistsError):
        _atomic.commit_dir(second, dest, overwrite=False)
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    _atomic.commit_dir(second, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    mask = os.umask(0)
    os.umask(mask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~mask


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (every later rename dies too)."""


def _fail_rename(monkeypatch, n_ok, exc, *, once=False):
    """os.replace succeeds n_ok times, then raises ``exc`` (every later call too, unless ``once``)."""
    real, calls = os.replace, []

    def failing(a, b):
        calls.append((a, b))
        if len(calls) > n_ok and not (once and len(calls) > n_ok + 1):
            raise exc
        return real(a, b)

    monkeypatch.setattr(os, "replace", failing)


def _committed_and_next(tmp_path):
    """A package folder committed once (a.txt) and the temporary folder of its next version (b.txt)."""
    dest = tmp_path / "pkg"
    first = _atomic.temp_dir_beside(dest)
    (first / "a.txt").write_text("1")
    _atomic.commit_dir(first, dest)
    second = _atomic.temp_dir_beside(dest)
    (second / "b.txt").write_text("2")
    return dest, second


def test_commit_dir_killed_between_its_renames_is_recovered(tmp_path, monkeypatch):
    dest, second = _committed_and_next(tmp_path)
    _fail_rename(monkeypatch, 1, _Killed)  # dest -> .pkg.old.* happens, then the process dies
    with pytest.raises(_Killed):
        _atomic.commit_dir(second, dest)
    monkeypatch.undo()
    assert not dest.exists() and [p for p in tmp_path.iterdir() if ".old." in p.name]
    assert _atomic.recover_dir(dest) is True
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]  # the last complete state
    assert _atomic.recover_dir(dest) is False  # nothing left to recover
    assert not [p for p in tmp_path.iterdir() if ".old." in p.name]
    # killed again; this time the next commit itself finishes the job
    _fail_rename(monkeypatch, 1, _Killed)
    with pytest.raises(_Killed):
        _atomic.commit_dir(second, dest)
    monkeypatch.undo()
    _atomic.commit_dir(second, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_commit_dir_error_between_its_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest, second = _committed_and_next(tmp_path)
    _fail_rename(monkeypatch, 1, OSError("disk gone"), once=True)  # only the second rename fails
    with pytest.raises(OSError, match="disk gone"):
        _atomic.commit_dir(second, dest)
    monkeypatch.undo()
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    assert not [p for p in tmp_path.iterdir() if ".old." in p.name]


@pytest.mark.parametrize("name,temporary", [("pkg", False), ("pkg.v2", False), (".pkg.abc.tmp", True),
                                            (".pkg.old.x1", True), ("pkg.tmp", True), (".hidden", True)])
def test_is_temporary_name(name, temporary):
    assert _atomic.is_temporary_name(name) is temporary


@pytest.fixture
def umask_002():
    """Run with umask 002 (group-writable), so that 0666 & ~umask differs from the usual 0644."""
    old = os.umask(0o002)
    yield 0o002
    os.umask(old)


def test_commit_dir_gives_its_files_the_umask_mode(tmp_path, umask_002):
    """Files and folders in a committed folder get what a plain open()/mkdir() gives (0666 / 0777 & ~umask),
    whatever wrote them: mkstemp-style 0600 files (as safetensors' save_file leaves), mkdtemp's 0700 folders;
    an executable keeps its x bits."""
    tmp = _atomic.temp_dir_beside(tmp_path / "dest")
    fd = os.open(tmp / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    sub = Path(tempfile.mkdtemp(dir=tmp))
    (sub / "inner.json").write_text("{}")
    os.chmod(sub / "inner.json", 0o600)
    (tmp / "tool.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp / "tool.sh", 0o700)
    os.symlink("weights.bin", tmp / "link")
    dest = _atomic.commit_dir(tmp, tmp_path / "dest")
    assert (dest / "weights.bin").stat().st_mode & 0o777 == 0o664
    assert (dest / sub.name).stat().st_mode & 0o777 == 0o775
    assert (dest / sub.name / "inner.json").stat().st_mode & 0o777 == 0o664
    assert (dest / "tool.sh").stat().st_mode & 0o777 == 0o775
    assert dest.stat().st_mode & 0o777 == 0o775
    assert (dest / "link").is_symlink()


def test_saved_model_weights_are_not_0600(tmp_path, umask_002):
    """save_model's files, weights.safetensors included, get 0666 & ~umask like a plain open() would."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import neuroadda_rt as nr
    from neuroadda_rt.models import UNet

    feats = np.random.default_rng(0).random((20, 8)).astype(np.float32)
    pkg = nr.save_model(UNet(widths=(4, 8)), tmp_path / "m", reference_features=feats)
    modes = {p.name: p.stat().st_mode & 0o777 for p in pkg.path.iterdir()}
    assert "weights.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o664), modes
