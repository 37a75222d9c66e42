"""The QC folder watcher.

:class:`QCService` watches the folder a microscope writes into (``watchdog``), waits until
each file is completely written (its size and modification time unchanged for ``settle``
seconds, then it must open and decode), feeds its tiles to a :class:`~neuroadda_rt.QCMonitor`,
prints alerts, and records every result in an SQLite database:

* ``files``: one row per file (``ok`` or ``error`` with the reason), with the file sequence
  number and the monitor's tile count after it;
* ``tiles``: one row per tile (witness score, reference similarity, uncertainty, artefact
  p-value, flag, likely cause) and a small PNG thumbnail of every flagged tile;
* ``windows``: one row per drift test (MMD², p-value, decision).

The monitor state is saved (atomically) before each file's rows are committed, keeping the
previous state beside it, so a restart always finds the state that matches the database:
nothing is reprocessed, nothing double-counted, and files that arrived while the watcher was
down are found by a scan at start-up. Unreadable files are recorded as errors and never stop
the watcher.

:func:`~neuroadda_rt.qc.report.write_report` renders the database as one self-contained HTML page.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import queue
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import FormatError, ShapeError, require
from .monitor import QCMonitor
from .reading import DEFAULT_PATTERNS, matches, read_tiles, split_tiles
from .report import write_report

log = logging.getLogger("neuroadda_rt")

# read_tiles, split_tiles and write_report live beside the watcher for its users
__all__ = ["QCService", "read_tiles", "split_tiles", "write_report", "DEFAULT_PATTERNS"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, seq INTEGER, status TEXT NOT NULL, size INTEGER, mtime REAL,
    processed_at REAL, n_tiles INTEGER, n_flagged INTEGER, tiles_after INTEGER, error TEXT);
CREATE TABLE IF NOT EXISTS tiles (
    file TEXT, idx INTEGER, tile_id TEXT, score REAL, similarity REAL, uncertainty REAL,
    artefact_p REAL, flagged INTEGER, kind TEXT, thumb BLOB, PRIMARY KEY (file, idx));
CREATE TABLE IF NOT EXISTS windows (
    idx INTEGER PRIMARY KEY, n_tiles INTEGER, mmd2 REAL, p_value REAL, drift INTEGER, rule TEXT,
    first_id TEXT, last_id TEXT, t_start REAL, t_end REAL, n_flagged INTEGER, file TEXT);
"""


# ----------------------------------------------------------------------------------------------
# thumbnails


def _thumbnail_png(tile: np.ndarray, size: int = 128) -> bytes:
    image = require("PIL.Image", "io")
    t = np.asarray(tile)
    if t.dtype != np.uint8:
        t = t.astype(np.float64)
        lo, hi = float(t.min()), float(t.max())
        if t.dtype.kind == "f" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        t = np.clip((t - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
    im = image.fromarray(t)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# the service


@dataclasses.dataclass
class _Pending:
    first_seen: float
    size: int = -1
    mtime: float = -1.0
    stable_since: float = 0.0
    attempts: int = 0


class QCService:
    """Watch a folder and monitor every image written into it.

    Parameters
    ----------
    folder : path-like
        The folder the microscope writes into (not recursive).
    monitor_factory : callable
        ``monitor_factory()`` builds a fresh :class:`~neuroadda_rt.QCMonitor` (called only when
        no saved state matches the database).
    model : object
        The encoder passed to :meth:`QCMonitor.load` when resuming.
    db : path-like, optional
        SQLite database; default ``<folder>/../<folder name>.qc.sqlite`` (beside the folder, so
        the watcher never sees its own files).
    tile_size : int, optional
        Cut images into tiles of this size (default: each 2-D image is a tile).
    patterns : sequence of str
        File-name globs to process.
    settle : float
        Seconds a file's size and mtime must stay unchanged before it is read.
    give_up : float
        Seconds after which a file that still fails to decode is recorded as an error.
    uncertainty : object, optional
        Passed to :meth:`QCMonitor.load`.
    echo : callable
        Where alert lines go (default ``print``).

    Examples
    --------
    >>> svc = QCService("acq/", lambda: QCMonitor(enc, ref), enc)  # doctest: +SKIP
    >>> svc.run(once=True)                                          # doctest: +SKIP
    """

    def __init__(self, folder, monitor_factory: Callable, model, *, db=None, tile_size: int | None = None,
                 patterns: Iterable[str] = DEFAULT_PATTERNS, settle: float = 1.0, give_up: float = 60.0,
                 uncertainty=None, echo: Callable[[str], None] = print, thumbnails: bool = True):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"watched folder {self.folder} does not exist")
        self.db_path = Path(db) if db is not None else self.folder.parent / f"{self.folder.name}.qc.sqlite"
        self.state_path = self.db_path.with_name(self.db_path.name + ".state.safetensors")
        self.prev_state_path = self.db_path.with_name(self.db_path.name + ".state.prev.safetensors")
        self.tile_size = tile_size
        self.patterns = tuple(patterns)
        self.settle = float(settle)
        self.give_up = float(give_up)
        self.echo = echo
        self.thumbnails = thumbnails
        self._pending: dict[Path, _Pending] = {}
        self._events: queue.Queue[Path] = queue.Queue()
        self._stop = threading.Event()
        self.db = sqlite3.connect(str(self.db_path), check_same_thread=False)
        self.db.executescript(_SCHEMA)
        self.db.commit()
        self.monitor = self._resume(monitor_factory, model, uncertainty)

    # -- state ------------------------------------------------------------------------------

    def _db_seq(self) -> int:
        row = self.db.execute("SELECT MAX(seq) FROM files").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _resume(self, factory, model, uncertainty):
        seq = self._db_seq()
        for p in (self.state_path, self.prev_state_path):
            if p.is_file():
                try:
                    mon = QCMonitor.load(p, model, uncertainty=uncertainty)
                except FormatError as exc:
                    log.warning("ignoring QC state %s: %s", p, exc)
                    continue
                if int(mon.loaded_extra.get("seq", -1)) == seq:
                    log.info("resumed QC state %s (file %d, %d tiles)", p.name, seq, mon.n_tiles)
                    return mon
        if seq > 0:
            raise FormatError(f"{self.db_path}: holds {seq} processed files but no QC state matches it "
                              f"({self.state_path.name}); move the database away to start afresh")
        mon = factory()
        self._save_state(mon, 0)
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
                ("folder", str(self.folder)), ("window", str(mon.window)), ("alpha", str(mon.alpha)),
                ("n_permutations", str(mon.n_permutations)), ("artefact_fpr", str(mon.artefact_fpr)),
                ("reference_size", str(len(mon.ref))), ("sigma", json.dumps(mon.sigma)),
                ("detectors", ",".join(mon.detectors)), ("tile_size", str(self.tile_size or ""))])
        return mon

    def _save_state(self, mon, seq: int) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.state_path.name}.", suffix=".tmp", dir=self.state_path.parent)
        os.close(fd)
        try:
            mon.save(tmp, extra={"seq": seq, "folder": str(self.folder)})
            if self.state_path.exists():
                os.replace(self.state_path, self.prev_state_path)
            os.replace(tmp, self.state_path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def processed(self) -> set[str]:
        """Paths (relative to the folder) already in the database, errors included."""
        return {r[0] for r in self.db.execute("SELECT path FROM files")}

    # -- processing -------------------------------------------------------------------------

    def _key(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.folder))
        except ValueError:
            return str(path.resolve())

    def _record_error(self, path: Path, st, msg: str) -> None:
        seq = self._db_seq() + 1
        # the monitor did not change: the state saved for seq-1 is still exact; re-save under seq
        self._save_state(self.monitor, seq)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (self._key(path), seq, "error", st.st_size if st else None, st.st_mtime if st else None,
                             time.time(), 0, 0, self.monitor.n_tiles, msg))
        self.echo(f"ERROR     {self._key(path)}: {msg}")

    def process_file(self, path: Path) -> bool:
        """Decode, monitor and record one complete file. Returns False when it is not yet readable."""
        key = self._key(path)
        try:
            st = path.stat()
            tiles = read_tiles(path, tile_size=self.tile_size)
        except FileNotFoundError:
            return True  # vanished: nothing to record
        except (FormatError, ShapeError, OSError) as exc:
            pend = self._pending.get(path)
            if pend is not None and time.time() - pend.first_seen < self.give_up:
                pend.attempts += 1
                return False
            self._record_error(path, None if isinstance(exc, FileNotFoundError) else _safe_stat(path), str(exc))
            return True
        try:
            ids = [f"{key}#{i}" for i in range(len(tiles))]
            rep = self.monitor.update(tiles, ids=ids, timestamp=st.st_mtime)
        except (ValueError, TypeError) as exc:  # bad dtype / shape / values for this monitor
            self._record_error(path, st, f"rejected by the monitor: {exc}")
            return True
        seq = self._db_seq() + 1
        self._save_state(self.monitor, seq)
        unc = rep.uncertainty if rep.uncertainty is not None else [None] * len(tiles)
        rows = []
        for i in range(len(tiles)):
            thumb = _thumbnail_png(tiles[i]) if (rep.flags[i] and self.thumbnails) else None
            rows.append((key, i, ids[i], float(rep.scores[i]), float(rep.similarity[i]),
                         None if unc[i] is None else float(unc[i]), float(rep.artefact_p[i]), int(rep.flags[i]),
                         rep.kinds[i], thumb))
        with self.db:
            self.db.execute("DELETE FROM tiles WHERE file = ?", (key,))
            self.db.executemany("INSERT INTO tiles VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            for w in rep.windows:
                self.db.execute("INSERT OR REPLACE INTO windows VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                                (w.index, w.n_tiles, w.mmd2, w.p_value, int(w.drift), w.rule, w.first_id, w.last_id,
                                 w.t_start, w.t_end, w.n_flagged, key))
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (key, seq, "ok", st.st_size, st.st_mtime, time.time(), len(tiles), rep.n_flagged,
                             self.monitor.n_tiles, None))
        self.echo(f"ok        {key}: {len(tiles)} tiles, {rep.n_flagged} flagged")
        for i in np.flatnonzero(rep.flags):
            self.echo(f"ARTEFACT  {ids[i]}: {rep.kinds[i]} (p={rep.artefact_p[i]:.2g})")
        for w in rep.windows:
            tag = "DRIFT    " if w.drift else "window   "
            self.echo(f"{tag} #{w.index} [{w.first_id} .. {w.last_id}]: MMD²={w.mmd2:.4g} p={w.p_value:.3g}"
                      + (f" ({w.rule} rule)" if w.drift else ""))
        return True

    def _candidates(self) -> list[Path]:
        done = self.processed()
        out = []
        for p in self.folder.iterdir():
            if p.is_file() and matches(p.name, self.patterns) and self._key(p) not in done:
                out.append(p)
        return sorted(out, key=lambda p: (_safe_mtime(p), p.name))

    def scan(self) -> int:
        """Queue every file in the folder not yet in the database. Returns how many."""
        new = self._candidates()
        for p in new:
            self._pending.setdefault(p, _Pending(first_seen=time.time()))
        return len(new)

    def step(self) -> int:
        """Process the pending files that are complete. Returns how many were finished."""
        while True:
            try:
                p = self._events.get_nowait()
            except queue.Empty:
                break
            if matches(p.name, self.patterns) and p.parent.resolve() == self.folder:
                if self._key(p) not in self.processed():
                    self._pending.setdefault(p, _Pending(first_seen=time.time()))
        now = time.time()
        finished = 0
        for p in sorted(self._pending, key=lambda q: (self._pending[q].first_seen, _safe_mtime(q), q.name)):
            pend = self._pending[p]
            st = _safe_stat(p)
            if st is None:
                del self._pending[p]
                continue
            if (st.st_size, st.st_mtime) != (pend.size, pend.mtime):
                pend.size, pend.mtime, pend.stable_since = st.st_size, st.st_mtime, now
                if self.settle > 0:
                    continue
            if now - pend.stable_since < self.settle:
                continue
            if self.process_file(p):
                del self._pending[p]
                finished += 1
        return finished

    def run(self, *, once: bool = False, poll: float = 0.25, timeout: float | None = None) -> int:
        """Process what is there and, unless ``once``, keep watching until :meth:`stop` (or
        ``timeout`` seconds). Returns the number of files processed."""
        total = 0
        self.scan()
        if once:
            deadline = time.time() + max(self.settle * 4, 5.0) + self.give_up
            while self._pending and time.time() < deadline:
                total += self.step()
                if self._pending:
                    time.sleep(min(poll, self.settle / 2 if self.settle else poll))
            return total
        observer = self._start_observer()
        t0 = time.time()
        try:
            while not self._stop.is_set():
                total += self.step()
                if timeout is not None and time.time() - t0 > timeout:
                    break
                self._stop.wait(poll)
        finally:
            observer.stop()
            observer.join(timeout=5)
        return total

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.db.close()

    def _start_observer(self):
        require("watchdog", "qc")
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        events = self._events

        class _Handler(FileSystemEventHandler):
            def on_created(self, event):
                if not event.is_directory:
                    events.put(Path(event.src_path))

            def on_modified(self, event):
                if not event.is_directory:
                    events.put(Path(event.src_path))

            def on_moved(self, event):  # write-then-rename is the safe way to deliver a file
                if not event.is_directory:
                    events.put(Path(event.dest_path))

            def on_closed(self, event):
                if not event.is_directory:
                    events.put(Path(event.src_path))

        observer = Observer()
        observer.schedule(_Handler(), str(self.folder), recursive=False)
        observer.start()
        # files that arrived between the scan and the observer's start
        self.scan()
        return observer


def _safe_stat(p: Path):
    try:
        return p.stat()
    except OSError:
        return None


def _safe_mtime(p: Path) -> float:
    st = _safe_stat(p)
    return st.st_mtime if st else 0.0
