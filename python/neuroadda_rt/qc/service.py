"""The QC folder watcher.

:class:`QCService` watches the folder a microscope writes into (``watchdog``), waits until
each file is completely written (its size and modification time unchanged for ``settle``
seconds, then it must open and decode), feeds its tiles to a :class:`~neuroadda_rt.QCMonitor`,
prints alerts, and records every result in an SQLite database:

* ``files``: one row per file (``ok``, ``duplicate`` or ``error`` with the reason), with the file
  sequence number, the monitor's tile count after it and the SHA-256 of its bytes and tiles;
* ``tiles``: one row per tile (witness score, reference similarity, uncertainty, artefact
  p-value, flag, likely cause) and a small PNG thumbnail of every flagged tile;
* ``windows``: one row per drift test (novelty, MMD², thresholds, p-value, decision);
* ``overviews``: each section holding flagged tiles, scaled down, the tiles outlined; ``examples``:
  reference tiles shown beside them in the report.

Files are keyed by content: a file that grows (a multi-page TIFF written page by page) is read again
and only its new pages are fed; an overwritten file is processed again; the same bytes under a new
name (a rename) are recorded as a duplicate, not fed twice. One watcher per database (a lock file with
the watcher's pid; a stale lock is taken over); links leading out of the folder are ignored; the
console gets one summary line per file.

The monitor state is saved (atomically) before each file's rows are committed, keeping the
previous state beside it, so a restart always finds the state that matches the database:
nothing is reprocessed, nothing double-counted, and files that arrived while the watcher was
down are found by a scan at start-up. Unreadable files are recorded as errors and never stop
the watcher.

:func:`~neuroadda_rt.qc.report.write_report` renders the database as one self-contained HTML page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .. import _atomic
from ..errors import FormatError, NeuroaddaError, ShapeError, require
from .monitor import QCMonitor
from .reading import DEFAULT_PATTERNS, matches, read_tiles, split_tiles
from .report import write_report

log = logging.getLogger("neuroadda_rt")

# read_tiles, split_tiles and write_report live beside the watcher for its users
__all__ = ["QCService", "read_tiles", "split_tiles", "write_report", "DEFAULT_PATTERNS", "WatcherLockedError"]


class WatcherLockedError(NeuroaddaError, RuntimeError):
    """Another live watcher holds the folder's database (its lock file names the process)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, seq INTEGER, status TEXT NOT NULL, size INTEGER, mtime REAL,
    processed_at REAL, n_tiles INTEGER, n_flagged INTEGER, tiles_after INTEGER, error TEXT, sha TEXT,
    tiles_sha TEXT);
CREATE TABLE IF NOT EXISTS tiles (
    file TEXT, idx INTEGER, tile_id TEXT, score REAL, similarity REAL, uncertainty REAL,
    artefact_p REAL, flagged INTEGER, kind TEXT, thumb BLOB, severity REAL, PRIMARY KEY (file, idx));
CREATE TABLE IF NOT EXISTS examples (idx INTEGER PRIMARY KEY, thumb BLOB);
CREATE TABLE IF NOT EXISTS overviews (file TEXT, page INTEGER, max_severity REAL, png BLOB, PRIMARY KEY (file, page));
CREATE TABLE IF NOT EXISTS windows (
    idx INTEGER PRIMARY KEY, n_tiles INTEGER, mmd2 REAL, p_value REAL, drift INTEGER, rule TEXT,
    first_id TEXT, last_id TEXT, t_start REAL, t_end REAL, n_flagged INTEGER, file TEXT, threshold REAL,
    novelty REAL, novelty_threshold REAL);
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


def _section_overview_png(section: np.ndarray, boxes: list[tuple[int, int, int]], size: int = 384) -> bytes:
    """A section scaled to at most ``size`` pixels with its flagged tiles outlined in red:
    ``boxes`` = (row, col, tile size) in section pixels."""
    image = require("PIL.Image", "io")
    from PIL import ImageDraw

    t = np.asarray(section)
    if t.dtype != np.uint8:
        t = t.astype(np.float64)
        lo, hi = float(t.min()), float(t.max())
        t = np.clip((t - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
    scale = min(1.0, size / max(t.shape))
    im = image.fromarray(t).convert("RGB")
    if scale < 1.0:
        im = im.resize((max(1, round(t.shape[1] * scale)), max(1, round(t.shape[0] * scale))))
    draw = ImageDraw.Draw(im)
    for r, c, ts in boxes:
        draw.rectangle([c * scale, r * scale, (c + ts) * scale - 1, (r + ts) * scale - 1], outline=(255, 0, 0),
                       width=2)
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
        self.lock_path = self.db_path.with_name(self.db_path.name + ".lock")
        self._take_lock()
        try:
            self.db = sqlite3.connect(str(self.db_path), check_same_thread=False)
            self.db.executescript(_SCHEMA)
        except BaseException:
            self._release_lock()
            raise
        self.db.commit()
        try:
            self.monitor = self._resume(monitor_factory, model, uncertainty)
        except BaseException:
            self.close()
            raise

    # -- the lock: one watcher per database -------------------------------------------------

    def _take_lock(self) -> None:
        """Create ``<db>.lock`` holding this pid (O_EXCL); a lock whose process is gone is stale and
        replaced, a live one refuses this watcher."""
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.lock_path.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    pid = -1
                if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                    raise WatcherLockedError(
                        f"{self.folder} is already watched by process {pid} (lock {self.lock_path}); stop it first, "
                        f"or delete the lock if that process is not a QC watcher") from None
                if pid == os.getpid():
                    raise WatcherLockedError(f"{self.folder} is already watched by this process "
                                             f"(lock {self.lock_path}); close the other QCService first") from None
                log.warning("removing stale QC lock %s (process %s is gone)", self.lock_path, pid)
                self.lock_path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            self._locked = True
            return
        raise WatcherLockedError(f"could not take the lock {self.lock_path}")

    def _release_lock(self) -> None:
        if getattr(self, "_locked", False):
            self.lock_path.unlink(missing_ok=True)
            self._locked = False

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
                ("statistic", mon.statistic), ("threshold", str(mon.threshold)),
                ("novelty_threshold", str(mon.novelty_threshold)), ("artefact_fpr", str(mon.artefact_fpr)),
                ("drift_note", mon.drift_note), ("calibration_note", getattr(mon, "calibration_note", "")),
                ("reference_size", str(len(mon.ref))), ("sigma", json.dumps(mon.sigma)),
                ("detectors", ",".join(mon.detectors)), ("tile_size", str(self.tile_size or ""))])
            self.db.executemany("INSERT OR REPLACE INTO examples VALUES (?, ?)",
                                [(i, _thumbnail_png(t)) for i, t in enumerate(getattr(mon, "examples", []))])
        for note in (mon.drift_note, getattr(mon, "calibration_note", "")):
            if note:
                self.echo(f"WARNING   {note}")
        return mon

    def _save_state(self, mon, seq: int) -> None:
        # the new state is written beside the old one (the package's atomic writer), the current one
        # becomes the previous one, then the new one takes its place: a crash leaves one of the two
        with _atomic.atomic_path(self.state_path) as tmp:
            mon.save(tmp, extra={"seq": seq, "folder": str(self.folder)})
            if self.state_path.exists():
                os.replace(self.state_path, self.prev_state_path)

    def processed(self) -> set[str]:
        """Paths (relative to the folder) already in the database, errors included."""
        return {r[0] for r in self.db.execute("SELECT path FROM files")}

    def _known(self) -> dict[str, tuple]:
        """path -> (size, mtime, sha, n_tiles, tiles_sha, status) of every recorded file."""
        return {r[0]: r[1:] for r in self.db.execute(
            "SELECT path, size, mtime, sha, n_tiles, tiles_sha, status FROM files")}

    def _changed(self, p: Path, known: dict) -> bool:
        """New, or its size / mtime differ from what was recorded (grown or overwritten)."""
        row = known.get(self._key(p))
        if row is None:
            return True
        st = _safe_stat(p)
        return st is not None and (row[0], row[1]) != (st.st_size, st.st_mtime)

    def _inside(self, p: Path) -> bool:
        """Whether ``p`` (a link is followed) is a file of the watched folder itself."""
        try:
            return p.resolve().parent == self.folder
        except OSError:
            return False

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
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (self._key(path), seq, "error", st.st_size if st else None, st.st_mtime if st else None,
                             time.time(), 0, 0, self.monitor.n_tiles, msg, None, None))
        self.echo(f"ERROR     {self._key(path)}: {msg}")

    def process_file(self, path: Path) -> bool:
        """Decode, monitor and record one complete file. Returns False when it is not yet readable.

        Files are keyed by content: a file whose bytes were already processed under another name
        (a rename) is recorded as a duplicate and not fed again; a file that grew since it was
        processed (a multi-page TIFF written page by page) feeds only its new tiles when its old
        tiles are unchanged; an overwritten file is processed again in full."""
        key = self._key(path)
        try:
            st = path.stat()
            raw = path.read_bytes()
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
        sha = hashlib.sha256(raw).hexdigest()
        known = self._known()
        prev = known.get(key)
        if prev is not None and prev[2] == sha:
            self._touch(key, st)  # same bytes (touched): nothing new
            return True
        same = [k for k, row in known.items() if row[2] == sha and row[5] in ("ok", "duplicate") and k != key]
        if same and prev is None:
            self._record_duplicate(key, st, sha, same[0])
            return True
        start = 0
        if prev is not None and prev[5] == "ok" and prev[3] and len(tiles) > prev[3] \
                and _tiles_sha(tiles[:prev[3]]) == prev[4]:
            start = int(prev[3])  # grown: the first tiles were already monitored
        try:
            ids = [f"{key}#{i}" for i in range(start, len(tiles))]
            rep = self.monitor.update(tiles[start:], ids=ids, timestamp=st.st_mtime)
        except (ValueError, TypeError) as exc:  # bad dtype / shape / values for this monitor
            self._record_error(path, st, f"rejected by the monitor: {exc}")
            return True
        seq = self._db_seq() + 1
        self._save_state(self.monitor, seq)
        unc = rep.uncertainty if rep.uncertainty is not None else [None] * len(ids)
        sev = rep.severity if rep.severity is not None else np.zeros(len(ids))
        rows = []
        for j in range(len(ids)):
            thumb = _thumbnail_png(tiles[start + j]) if (rep.flags[j] and self.thumbnails) else None
            rows.append((key, start + j, ids[j], float(rep.scores[j]), float(rep.similarity[j]),
                         None if unc[j] is None else float(unc[j]), float(rep.artefact_p[j]), int(rep.flags[j]),
                         rep.kinds[j], thumb, float(sev[j])))
        n_flagged = rep.n_flagged
        if start:  # the flags of the tiles monitored before the file grew
            n_flagged += self.db.execute("SELECT COUNT(*) FROM tiles WHERE file = ? AND flagged = 1 AND idx < ?",
                                         (key, start)).fetchone()[0]
        overviews = self._overviews(path, rep, start, sev) if (rep.n_flagged and self.thumbnails) else []
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO overviews VALUES (?,?,?,?)", [(key, *o) for o in overviews])
            if start == 0:
                self.db.execute("DELETE FROM tiles WHERE file = ?", (key,))
            self.db.executemany("INSERT OR REPLACE INTO tiles VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            for w in rep.windows:
                self.db.execute("INSERT OR REPLACE INTO windows VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                (w.index, w.n_tiles, w.mmd2, w.p_value, int(w.drift), w.rule, w.first_id, w.last_id,
                                 w.t_start, w.t_end, w.n_flagged, key, w.threshold, w.novelty, w.novelty_threshold))
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (key, seq, "ok", st.st_size, st.st_mtime, time.time(), len(tiles), n_flagged,
                             self.monitor.n_tiles, None, sha, _tiles_sha(tiles)))
        self.echo(self._summary_line(key, rep, len(ids), start, prev))
        return True

    def _overviews(self, path: Path, rep, start: int, sev) -> list[tuple]:
        """(page, largest severity, PNG) of every page of the file holding a flagged tile, the flagged
        tiles outlined (tile grid of :func:`split_tiles`: row-major per page)."""
        if not self.tile_size:
            return []  # every page is one tile: its thumbnail already shows the whole page
        try:
            stack = read_tiles(path)  # the pages, uncut
        except (FormatError, ShapeError, OSError):
            return []
        out = []
        t = self.tile_size
        n, h, w = stack.shape
        gh, gw = h // t, w // t
        by_page: dict[int, list] = {}
        for j in np.flatnonzero(rep.flags):
            i = start + int(j)
            page, rest = divmod(i, gh * gw)
            by_page.setdefault(page, []).append((rest // gw * t, rest % gw * t, float(sev[j])))
        for page, items in by_page.items():
            png = _section_overview_png(stack[page], [(r, c, t) for r, c, _ in items])
            out.append((page, max(v for _, _, v in items), png))
        return out

    def _summary_line(self, key, rep, n, start, prev) -> str:
        """One console line per file: tiles, flags by likely cause, windows completed and drift."""
        what = "ok       " if prev is None else ("grown    " if start else "rewritten")
        causes: dict[str, int] = {}
        for k in rep.kinds:
            if k:
                causes[k] = causes.get(k, 0) + 1
        line = f"{what} {key}: {n} tiles" + (f" (from tile {start})" if start else "")
        line += f", {rep.n_flagged} flagged" + (" (" + ", ".join(f"{k} {c}" for k, c in
                                                                 sorted(causes.items(), key=lambda kv: -kv[1]))
                                                + ")" if causes else "")
        if not rep.windows:  # say how far the next window is, so a window that never completes is visible
            line += f"; next window {self.monitor.summary()['window_fill']}/{self.monitor.window} tiles"
        for w in rep.windows:
            if w.rule == "uncalibrated":
                line += f"; window #{w.index} not tested"
            else:
                line += f"; window #{w.index}"
                if w.novelty_threshold == w.novelty_threshold:  # not NaN: the statistic is in use
                    line += f" novelty {w.novelty:.3f} (threshold {w.novelty_threshold:.3f})"
                if w.threshold == w.threshold:
                    line += f" MMD² {w.mmd2:.4g} (threshold {w.threshold:.4g})"
                line += f" DRIFT ({w.rule})" if w.drift else ""
        return line

    def _touch(self, key: str, st) -> None:
        with self.db:
            self.db.execute("UPDATE files SET size = ?, mtime = ? WHERE path = ?", (st.st_size, st.st_mtime, key))

    def _record_duplicate(self, key: str, st, sha: str, original: str) -> None:
        seq = self._db_seq() + 1
        self._save_state(self.monitor, seq)  # unchanged monitor, re-saved under the new sequence number
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (key, seq, "duplicate", st.st_size, st.st_mtime, time.time(), 0, 0, self.monitor.n_tiles,
                             f"same content as {original} (renamed or copied): not counted again", sha, None))
        self.echo(f"duplicate {key}: same content as {original}, not counted again")

    def _candidates(self) -> list[Path]:
        known = self._known()
        out = []
        for p in self.folder.iterdir():
            if (matches(p.name, self.patterns) and self._inside(p) and p.is_file()
                    and self._changed(p, known)):
                out.append(p)
        return sorted(out, key=lambda p: (_safe_mtime(p), p.name))

    def scan(self) -> int:
        """Queue every file in the folder that is new or changed since it was recorded. Returns how many."""
        new = self._candidates()
        for p in new:
            self._pending.setdefault(p, _Pending(first_seen=time.time()))
        return len(new)

    def step(self) -> int:
        """Process the pending files that are complete. Returns how many were finished."""
        known = None
        while True:
            try:
                p = self._events.get_nowait()
            except queue.Empty:
                break
            if matches(p.name, self.patterns) and p.parent == self.folder and self._inside(p):
                known = self._known() if known is None else known
                if self._changed(p, known):
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
        """Close the database and release the folder's lock."""
        with contextlib.suppress(AttributeError):
            self.db.close()
        self._release_lock()

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


def _tiles_sha(tiles: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tiles).tobytes()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _safe_stat(p: Path):
    try:
        return p.stat()
    except OSError:
        return None


def _safe_mtime(p: Path) -> float:
    st = _safe_stat(p)
    return st.st_mtime if st else 0.0
