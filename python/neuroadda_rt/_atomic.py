"""Atomic file writes shared by every module: write beside the target, then ``os.replace``.

A reader never sees a half-written file, and an interrupted write leaves the previous file (or
nothing) in place. Temporary names start with ``.`` and end with ``.tmp`` so that folder watchers
and globbing skip them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger("neuroadda_rt")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode() -> int:
    return 0o666 & ~_umask()


def _normalize_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would:
    folders ``0o777 & ~umask``, files ``0o666 & ~umask`` (executables, files with any x bit,
    ``0o777 & ~umask``, as a linker makes them).

    Whatever filled the folder may have made files 0600 (``mkstemp``, safetensors' ``save_file``)
    or folders 0700 (``mkdtemp``); results are meant to be shared. Symlinks are left alone.
    """
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, 0o777 & ~mask)
            elif stat.S_ISREG(st.st_mode):
                os.chmod(p, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The file gets the usual umask permissions (``mkstemp`` would leave 0600), since results are
    meant to be shared.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(out) as tmp:
    ...     _ = tmp.write_text("done")
    >>> out.read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsync'ed before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def json_default(o):
    """``json.dumps`` fallback for NumPy scalars and arrays, paths and dataclasses."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    return str(o)


def dumps_json(obj) -> str:
    """Indented JSON text of ``obj`` (NumPy values converted)."""
    return json.dumps(obj, indent=2, default=json_default)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, dumps_json(obj))


class JsonRecord:
    """Mixin for result objects that have ``to_dict()``: ``to_json`` returns the JSON text and,
    given a path, also writes it atomically. One implementation for every result type."""

    def to_dict(self) -> dict:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The object as indented JSON text; also written atomically to ``path`` when given."""
        text = dumps_json(self.to_dict())
        if path is not None:
            write_text(path, text)
        return text


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 150, **savefig_kwargs) -> Path:
    """Save a matplotlib figure to ``path`` atomically, in the format of its suffix (PNG without one).

    Extra keyword arguments go to ``fig.savefig`` (e.g. ``bbox_inches="tight"``).
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, **savefig_kwargs)
    return path


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save ``array`` as ``.npy`` (never pickled) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
    return Path(path)


def read_json_source(text_or_path, what: str) -> str:
    """JSON text given either itself or a path to a file holding it (``what`` names it in errors)."""
    text = str(text_or_path)
    if text.lstrip().startswith("{"):
        return text
    p = Path(text)
    if not p.exists():
        raise FileNotFoundError(f"{what} file not found: {p}")
    return p.read_text(encoding="utf-8")


def temp_dir_beside(dest: str | os.PathLike) -> Path:
    """A fresh hidden temporary folder beside ``dest``, to fill and then :func:`commit_dir`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is one of the hidden working names of this module (``.x.*.tmp`` being
    filled, ``.x.old.*`` being replaced) or any hidden name: listings of results skip them."""
    return name.startswith(".") or name.endswith(".tmp") or ".old." in name


def _old_copies(dest: Path) -> list[Path]:
    """Folders that :func:`commit_dir` renamed ``dest`` to, newest first."""
    olds = [p for p in dest.parent.glob(f".{dest.name}.old.*") if p.is_dir() and not p.is_symlink()]
    return sorted(olds, key=lambda p: p.stat().st_ctime, reverse=True)


def recover_dir(dest: str | os.PathLike) -> bool:
    """Undo a :func:`commit_dir` that was killed between its two renames.

    Such a kill leaves ``dest`` missing and its previous content in a hidden ``.dest.old.*``
    folder: that folder is renamed back to ``dest`` (the last complete state; the new copy may
    be incomplete, so it is not guessed at). Returns True when ``dest`` was restored; False
    when there was nothing to recover (``dest`` exists, or no old copy) or it could not be
    renamed (a read-only folder; the warning says what to rename).
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink() or not dest.parent.is_dir():
        return False
    olds = _old_copies(dest)
    if not olds:
        return False
    try:
        os.replace(olds[0], dest)
    except OSError as exc:
        if dest.exists():  # another process restored or wrote it meanwhile
            return False
        log.warning("%s: an interrupted replacement left the previous copy in %s and it could not be put "
                    "back (%s); rename it to %s", dest, olds[0], exc, dest.name)
        return False
    log.warning("%s: restored the previous copy from %s (a replacement of it had been interrupted)",
                dest, olds[0].name)
    return True


def commit_dir(tmp: str | os.PathLike, dest: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Move the finished folder ``tmp`` to ``dest`` by renames only.

    An existing ``dest`` is first renamed aside (``.dest.old.*``) and deleted after the new folder
    is in place, so ``dest`` is never half-written. An error between the two renames puts the old
    folder back; a kill between them leaves it aside, and the next :func:`commit_dir` or
    :func:`recover_dir` of ``dest`` puts it back. With ``overwrite=False`` an existing ``dest``
    raises ``FileExistsError``. The folder and everything in it get the usual umask permissions
    (``mkdtemp`` makes 0700 folders, ``mkstemp`` and safetensors 0600 files): see
    :func:`_normalize_modes`.
    """
    tmp, dest = Path(tmp), Path(dest)
    _normalize_modes(tmp)
    recover_dir(dest)
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"{dest}: already exists (pass overwrite=True to replace it)")
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        old.rmdir()
        os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except BaseException:
            if not dest.exists():
                os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest
