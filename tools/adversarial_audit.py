"""Re-run the adversarial audit's classes of bad input and count the outcomes (issue 19).

Classes: ``kernels`` (every public kernel with bad dtypes, shapes and values), ``threads`` (the kernels from
many threads at once against a serial run), ``packages`` (tampered model packages), ``files`` (truncated and
corrupt volume files), ``cli`` (misuse of every command) and ``watcher`` (``qc watch`` killed with SIGKILL
and restarted).

Every case ends in one outcome:

``ok``        valid input, and the answer equals an independent reference (float64 NumPy, a brute-force loop)
``typed``     refused with a typed error (``NeuroaddaError`` or an ``OSError`` naming the file; for the CLI:
              exit status 2 and no traceback)
``builtin``   refused with a plain ``ValueError`` / ``TypeError`` (clear, but not one of ours)
``untyped``   any other exception (``AttributeError``, ``RecursionError``, a pybind11 argument dump, ...)
``wrong``     an answer that differs from the reference, or tampering that went unnoticed
``crash``     the interpreter died (signal) -- each class runs in its own subprocess so this is seen

    python tools/adversarial_audit.py                  # all classes, a table of counts
    python tools/adversarial_audit.py --only kernels --show untyped,wrong,crash
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

CLASSES = ("kernels", "threads", "packages", "files", "cli", "watcher")
OUTCOMES = ("ok", "typed", "builtin", "untyped", "wrong", "crash")
REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "tests" / "assets" / "tiny_model"


class Wrong(Exception):
    """An answer that differs from the reference, or a tamper that was not noticed."""


def classify(exc: BaseException | None) -> str:
    from neuroadda_rt.errors import NeuroaddaError

    if exc is None:
        return "ok"
    if isinstance(exc, Wrong):
        return "wrong"
    if "Invoked with:" in str(exc) or "incompatible function arguments" in str(exc):
        return "untyped"  # a pybind11 dump of the arguments is not a message for a user
    if isinstance(exc, NeuroaddaError) or isinstance(exc, OSError):
        return "typed"
    if type(exc) in (ValueError, TypeError):
        return "builtin"
    return "untyped"


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------
def _ref_mmd2(x, y, sigma):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    sigmas = np.atleast_1d(np.asarray(sigma, np.float64))

    def k(a, b):  # averaged over the bandwidths, as the library documents for a sequence
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.mean([np.exp(-d2 / (2 * s ** 2)) for s in sigmas], axis=0)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def _ref_vi(seg, gt):
    seg, gt = np.asarray(seg).ravel(), np.asarray(gt).ravel()
    keep = gt != 0
    seg, gt = seg[keep], gt[keep]
    if seg.size == 0:
        return 0.0, 0.0
    _, s = np.unique(seg, return_inverse=True)
    _, g = np.unique(gt, return_inverse=True)
    p = np.zeros((s.max() + 1, g.max() + 1))
    np.add.at(p, (s, g), 1)
    p /= p.sum()
    ps, pg = p.sum(1), p.sum(0)
    nz = p > 0
    h_s_given_g = -(p[nz] * np.log2(p[nz] / pg[np.nonzero(nz)[1]])).sum()
    h_g_given_s = -(p[nz] * np.log2(p[nz] / ps[np.nonzero(nz)[0]])).sum()
    return h_s_given_g, h_g_given_s


def kernel_cases():
    import neuroadda_rt as nr

    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 4))
    dtypes = [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.float16, np.float32, np.float64,
              np.complex64, object, "U3", "datetime64[s]"]
    shapes = {"0-d": (), "1-d": (4,), "(0,4)": (0, 4), "(6,0)": (6, 0), "(1,4)": (1, 4), "(6,4)": (6, 4),
              "3-d": (6, 4, 2)}

    def make(shape, dtype):
        a = rng.normal(size=shape) * 3
        try:
            return a.astype(dtype)
        except (TypeError, ValueError):
            return np.zeros(shape, dtype=dtype)

    def check_mmd(x, y, sigma=1.5):
        got = nr.mmd2(x, y, sigma=sigma)
        xf, yf = np.asarray(x), np.asarray(y)
        if xf.dtype.kind not in "biuf" or xf.ndim != 2 or len(xf) < 2 or xf.shape[1] == 0:
            raise Wrong(f"accepted {xf.dtype} {xf.shape} and returned {got}")
        ref = _ref_mmd2(xf, yf, sigma)
        if not np.isclose(got, ref, rtol=1e-3, atol=1e-5):
            raise Wrong(f"mmd2 {got} != reference {ref}")

    for dname in dtypes:
        for sname, shape in shapes.items():
            x, y = make(shape, dname), make(shape, dname)
            yield f"mmd2 {np.dtype(dname)} {sname}", lambda x=x, y=y: check_mmd(x, y)
            yield f"median_sigma {np.dtype(dname)} {sname}", lambda x=x, y=y: _finite(nr.median_sigma(x, y))
    yield "mmd2 mismatched d", lambda: check_mmd(base, rng.normal(size=(6, 5)))
    yield "mmd2 non-contiguous", lambda: check_mmd(rng.normal(size=(6, 8))[:, ::2], base)
    yield "mmd2 Fortran order", lambda: check_mmd(np.asfortranarray(base), base + 1)
    yield "mmd2 large offset", lambda: check_mmd(base + 1e4, base + 1e4 + 0.5, sigma=2.0)
    for bad in (np.nan, np.inf, -np.inf, 3e38):
        x = base.copy()
        x[2, 1] = bad
        yield f"mmd2 value {bad}", lambda x=x: check_mmd(x, base)
    for sigma in (0, -1, np.nan, np.inf, "a", [1, 2], None, True, 1e-300):
        yield f"mmd2 sigma={sigma!r}", lambda s=sigma: check_mmd(base, base + 1, sigma=s) if s is not None \
            else _finite(nr.mmd2(base, base + 1))
    for n_perm in (0, -1, 2 ** 63, 1.5, "10", None):
        yield f"mmd2_test n_permutations={n_perm!r}", lambda p=n_perm: nr.mmd2_test(base, base + 1,
                                                                                   n_permutations=p)
    for seed in (-1, 2 ** 70, "s", 1.5):
        yield f"mmd2_test seed={seed!r}", lambda s=seed: nr.mmd2_test(base, base + 1, n_permutations=10, seed=s)
    for est in ("biased", "nope", None):
        yield f"mmd2 estimator={est!r}", lambda e=est: nr.mmd2(base, base + 1, sigma=1.0, estimator=e)
    for feats in (None, [], [base], [base, "x"], [base, base[:, :3]], {"a": base}):
        yield f"mmd2_matrix {type(feats).__name__} {len(feats) if hasattr(feats, '__len__') else ''}", \
            lambda f=feats: nr.mmd2_matrix(f, sigma=1.0)

    def check_vi(seg, gt, **kw):
        got = nr.variation_of_information(seg, gt, **kw)
        s, g = np.asarray(seg), np.asarray(gt)
        if s.dtype.kind not in "biu" or g.dtype.kind not in "biu" or s.shape != g.shape:
            raise Wrong(f"accepted {s.dtype}/{g.dtype} {s.shape}/{g.shape} and returned {got}")
        if not kw:
            ref = _ref_vi(s, g)
            if not np.allclose(got, ref, atol=1e-9):
                raise Wrong(f"VI {got} != reference {ref}")

    seg = rng.integers(0, 5, size=(3, 8, 8))
    for dname in (np.bool_, np.int8, np.uint8, np.int64, np.uint64, np.float32, np.float64, object):
        a = seg.astype(dname)
        yield f"variation_of_information {np.dtype(dname)}", lambda a=a: check_vi(a, seg)
        yield f"adapted_rand_error {np.dtype(dname)}", lambda a=a: nr.adapted_rand_error(a, seg)
    yield "variation_of_information negative ids", lambda: check_vi(seg - 2, seg)
    yield "variation_of_information shape mismatch", lambda: check_vi(seg, seg[:, :7])
    yield "variation_of_information empty", lambda: check_vi(seg[:0], seg[:0])
    yield "variation_of_information 4-d", lambda: check_vi(seg[None], seg[None])
    yield "variation_of_information 0-d", lambda: check_vi(np.array(3), np.array(3))
    yield "variation_of_information uint64 >= 2**63", lambda: check_vi(seg.astype(np.uint64) + 2 ** 63, seg)
    for ig in (None, "x", [1.5], [-1], 2 ** 70):
        yield f"variation_of_information ignore_gt={ig!r}", lambda ig=ig: nr.variation_of_information(
            seg, seg, ignore_gt=ig)
    for base_ in (0, 1, -2, "e"):
        yield f"variation_of_information base={base_!r}", lambda b=base_: nr.variation_of_information(seg, seg,
                                                                                                     base=b)
    for alpha in (-0.1, 1.5, np.nan, "a"):
        yield f"adapted_rand_error alpha={alpha!r}", lambda a=alpha: nr.adapted_rand_error(seg, seg, alpha=a)

    probs = rng.random((2, 1, 8, 8)).astype(np.float32)

    def check_unc(p, **kw):
        got = nr.tile_uncertainty(p, **kw)
        if not np.all(np.isfinite(got)) or got.shape[0] != np.asarray(p).shape[0]:
            raise Wrong(f"tile_uncertainty returned {got}")

    for dname in (np.bool_, np.uint8, np.int64, np.float16, np.float32, np.float64, object):
        yield f"tile_uncertainty {np.dtype(dname)}", lambda d=dname: check_unc(probs.astype(d))
    for shape in ((), (8,), (8, 8), (0, 1, 8, 8), (2, 0, 8, 8), (2, 1, 0, 8), (1, 2, 1, 8, 8, 1)):
        yield f"tile_uncertainty shape {shape}", lambda s=shape: check_unc(np.full(s, 0.5, np.float32))
    for v in (np.nan, np.inf, -0.5, 1.5):
        p = probs.copy()
        p[0, 0, 1, 1] = v
        yield f"tile_uncertainty value {v}", lambda p=p: check_unc(p)
    for measure in ("variance", "nope", None, 3):
        yield f"tile_uncertainty measure={measure!r}", lambda m=measure: check_unc(probs, measure=m)
    for mc in ("no", None, 2):
        yield f"tile_uncertainty mc_samples={mc!r}", lambda m=mc: check_unc(probs, mc_samples=m)
    for dev in ("gpu", "cuda:9", None):
        yield f"mmd2 device={dev!r}", lambda d=dev: nr.mmd2(base, base + 1, sigma=1.0, device=d)

    def bad_table():
        u64 = np.uint64
        state = {"entries": (np.array([1, 2], u64), np.array([1, 2], u64), np.array([2 ** 63, 2 ** 63], u64))}
        t = nr.ContingencyTable.__new__(nr.ContingencyTable)
        t.__setstate__(state)
        raise Wrong(f"a table whose counts sum to 2**64 was accepted ({t!r})")

    yield "ContingencyTable overflowing counts", bad_table


def _finite(v):
    if not np.isfinite(v):
        raise Wrong(f"returned {v}")


# ---------------------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------------------
def thread_cases():
    import neuroadda_rt as nr

    rng = np.random.default_rng(1)
    data = [(rng.normal(size=(128, 32)).astype(np.float32), rng.normal(size=(96, 32)).astype(np.float32) + 0.1 * i)
            for i in range(8)]
    segs = [rng.integers(0, 50, size=(4, 64, 64)) for _ in range(8)]
    probs = [rng.random((4, 3, 32, 32)).astype(np.float32) for _ in range(8)]
    jobs = {
        "mmd2": lambda i: nr.mmd2(*data[i], sigma=4.0),
        "mmd2_test": lambda i: nr.mmd2_test(*data[i], sigma=4.0, n_permutations=200, seed=i).p_value,
        "variation_of_information": lambda i: nr.variation_of_information(segs[i], segs[(i + 1) % 8]),
        "adapted_rand_error": lambda i: nr.adapted_rand_error(segs[i], segs[(i + 1) % 8]),
        "tile_uncertainty": lambda i: nr.tile_uncertainty(probs[i]).tolist(),
    }
    for name, job in jobs.items():
        for n_threads in (2, 8, 32):
            def run(job=job, n_threads=n_threads):
                serial = [job(i % 8) for i in range(n_threads)]
                out: list = [None] * n_threads
                errors: list = []

                def work(i):
                    try:
                        out[i] = job(i % 8)
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        errors.append(exc)

                ts = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                if errors:
                    raise errors[0]
                if json.dumps(out, default=float) != json.dumps(serial, default=float):
                    raise Wrong("threaded results differ from the serial run")
            yield f"{name} x {n_threads} threads", run


# ---------------------------------------------------------------------------------------------------------
# tampered packages
# ---------------------------------------------------------------------------------------------------------
def package_cases(tmp: Path):
    import neuroadda_rt as nr

    def tampered(edit):
        def run():
            d = Path(tempfile.mkdtemp(dir=tmp)) / "pkg"
            shutil.copytree(TINY_MODEL, d)
            _stamp(d)  # a current-format package: model.json carries the checksum of its own content
            edit(d)
            nr.load_model(d)
            raise Wrong("a tampered package loaded")
        return run

    files = sorted(p.name for p in TINY_MODEL.iterdir())
    for name in files:
        def truncate(d, name=name):
            p = d / name
            p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])

        def flip(d, name=name):
            p = d / name
            b = bytearray(p.read_bytes())
            b[len(b) // 2] ^= 0x01
            p.write_bytes(bytes(b))

        def delete(d, name=name):
            (d / name).unlink()

        def empty(d, name=name):
            (d / name).write_bytes(b"")

        def link_out(d, name=name):
            outside = d.parent / f"outside-{name}"
            shutil.copy(d / name, outside)
            (d / name).unlink()
            (d / name).symlink_to(outside)

        for kind, edit in (("truncated", truncate), ("one bit flipped", flip), ("deleted", delete),
                           ("emptied", empty), ("symlink leaving the package", link_out)):
            yield f"{name} {kind}", tampered(edit)

    def meta_edit(change):
        def edit(d):
            p = d / "model.json"
            m = json.loads(p.read_text())
            change(m)
            p.write_text(json.dumps(m))
        return edit

    edits = {
        "network unet": lambda m: m.update(network="unet"),
        "widths []": lambda m: m["network"].update(widths=[]) if isinstance(m.get("network"), dict) else None,
        "widths 1e12": lambda m: m["network"].update(widths=[4, 8, 1e12]) if isinstance(m.get("network"), dict)
        else None,
        "normalization list": lambda m: m.update(normalization=[1, 2]),
        "representation rgb": lambda m: m.update(representation="rgb"),
        "name changed": lambda m: m.update(name="other"),
        "organism changed": lambda m: m.update(organism="cat"),
        "format unknown": lambda m: m.update(format="neuroadda_rt.model/99"),
    }
    for label, change in edits.items():
        yield f"model.json {label}", tampered(meta_edit(change))

    def deep(d):
        (d / "model.json").write_text("[" * 100_000 + "]" * 100_000)

    def huge(d):
        (d / "model.json").write_text('{"name": "' + "x" * (64 << 20) + '"}')

    yield "model.json nested 100000 deep", tampered(deep)
    yield "model.json 64 MB", tampered(huge)

    def npy_claim(d):
        p = d / "reference_features.npy"
        header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 16), }"
        header += " " * (118 - len(header)) + "\n"
        p.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())

    yield "reference_features.npy claims 64 TiB", tampered(npy_claim)
    yield "package folder is a file", lambda: nr.load_model(_a_file(tmp))
    yield "package folder missing", lambda: nr.load_model(tmp / "missing")


def _stamp(d: Path) -> None:
    from neuroadda_rt.runtime.source import METADATA_CHECKSUM, metadata_sha256

    meta = json.loads((d / "model.json").read_text())
    meta[METADATA_CHECKSUM] = metadata_sha256(meta)
    (d / "model.json").write_text(json.dumps(meta, indent=2))


def _a_file(tmp: Path) -> Path:
    p = tmp / "a_file"
    p.write_text("x")
    return p


# ---------------------------------------------------------------------------------------------------------
# truncated and corrupt files
# ---------------------------------------------------------------------------------------------------------
def file_cases(tmp: Path):
    import neuroadda_rt as nr

    rng = np.random.default_rng(2)
    vol = rng.integers(0, 255, size=(4, 64, 64), dtype=np.uint8)

    def write(kind, path):
        if kind == "npy":
            np.save(path, vol)
        elif kind == "tif":
            import tifffile

            tifffile.imwrite(path, vol)
        elif kind == "h5":
            import h5py

            with h5py.File(path, "w") as f:
                f.create_dataset("raw", data=vol, chunks=(1, 32, 32), compression="gzip")
        elif kind == "zarr":
            nr.io.write_volume(str(path), vol)
        return path

    def read_all(spec):
        v = nr.open_volume(spec)
        got = np.asarray(v[:]) if hasattr(v, "__getitem__") else np.asarray(v)
        if got.shape != vol.shape or not np.array_equal(got, vol):
            raise Wrong(f"returned data that differs from what was written ({got.shape})")

    for kind, suffix, spec_suffix in (("npy", ".npy", ""), ("tif", ".tif", ""), ("h5", ".h5", ":raw"),
                                      ("zarr", ".zarr", "")):
        for frac in (0.0, 0.1, 0.5, 0.9, 0.999):
            def run(kind=kind, suffix=suffix, spec_suffix=spec_suffix, frac=frac):
                d = Path(tempfile.mkdtemp(dir=tmp))
                p = write(kind, d / f"v{suffix}")
                targets = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()
                                                         and q.name not in ("zarr.json", ".zarray", ".zattrs",
                                                                            ".zgroup"))
                for q in targets[:1] if p.is_file() else targets[len(targets) // 2:len(targets) // 2 + 1]:
                    b = q.read_bytes()
                    q.write_bytes(b[: int(len(b) * frac)])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a MissingChunksWarning is a report, not an answer
                    read_all(f"{p}{spec_suffix}")
            yield f"{kind} truncated to {frac:.1%}", run
        def garbage(kind=kind, suffix=suffix, spec_suffix=spec_suffix):
            d = Path(tempfile.mkdtemp(dir=tmp))
            p = d / f"v{suffix}"
            if kind == "zarr":
                p.mkdir()
                (p / "zarr.json").write_text("{not json")
            else:
                p.write_bytes(os.urandom(4096))
            read_all(f"{p}{spec_suffix}")
        yield f"{kind} random bytes", garbage
    yield "h5 missing key", lambda: read_all(f"{write('h5', Path(tempfile.mkdtemp(dir=tmp)) / 'v.h5')}:nope")
    yield "volume path is a directory of nothing", lambda: read_all(str(Path(tempfile.mkdtemp(dir=tmp))))
    yield "unknown suffix", lambda: read_all(str(_a_file(Path(tempfile.mkdtemp(dir=tmp)))) + ".xyz")


# ---------------------------------------------------------------------------------------------------------
# CLI misuse
# ---------------------------------------------------------------------------------------------------------
def cli_cases(tmp: Path):
    import contextlib
    import io

    from neuroadda_rt.cli import main

    npz = tmp / "f.npz"
    np.savez(npz, a=np.zeros(3))
    a_file = _a_file(tmp)
    model = str(TINY_MODEL)
    good = tmp / "good.npy"
    np.save(good, np.random.default_rng(0).integers(0, 255, (4, 64, 64), dtype=np.uint8))
    argvs = [
        [], ["nope"], ["rank"], ["rank", str(tmp / "missing.h5")], ["rank", str(npz), "--zoo", model],
        ["rank", str(good), "--zoo", str(tmp / "nozoo")], ["rank", str(good), "--zoo", str(a_file)],
        ["rank", str(good), "--zoo", model, "--tile-size", "-5"], ["rank", str(good), "--zoo", model, "--seed", "-1"],
        ["rank", str(good), "--zoo", model, "--permutations", str(2 ** 63)],
        ["select", str(good), "--model", model, "-n", "0", "--out", str(tmp / "s")],
        ["select", str(good), "--model", model, "-n", "2", "--out", str(a_file)],
        ["select", str(good), "--model", str(npz), "-n", "2", "--out", str(tmp / "s2")],
        ["finetune", str(tmp / "noann"), "--out", str(tmp / "ft")], ["finetune", str(a_file), "--out", str(tmp / "ft")],
        ["evaluate", model, str(good), str(npz)], ["evaluate", str(npz), str(good), str(good)],
        ["export", model, "--format", "onnx", "--out", str(tmp / "e.onnx")],
        ["export", model, "--format", "int8", "--part", "encoder", "--out", str(tmp / "q.onnx")],
        ["export", model, "--format", "onnx", "--part", "encoder", "--out", str(a_file / "x.onnx")],
        ["report", str(tmp / "norun")], ["report", str(a_file)],
        ["zoo", "build", str(a_file)], ["zoo", "verify", str(tmp / "nozoo")], ["zoo", "show", "nope"],
        ["qc", "watch", str(tmp / "nofolder"), "--model", model],
        ["qc", "report", "--db", str(a_file), "--out", str(tmp / "qc.html")],
        ["experiment", str(tmp / "missing.yaml")], ["experiment", str(a_file)],
    ]
    for argv in argvs:
        def run(argv=argv):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = main(list(argv))
                except SystemExit as exc:
                    rc = exc.code
            text = err.getvalue()
            if "Traceback" in text:
                raise RuntimeError(f"traceback: {text.strip().splitlines()[-1]}")
            if rc == 0:
                return None
            if rc != 2:
                raise RuntimeError(f"exit status {rc}: {text.strip()[-200:]}")
            # progress bars and logged warnings may share stderr; the error itself must be one line
            lines = [ln for ln in text.strip().splitlines() if "error:" in ln]
            if len(lines) != 1:
                raise RuntimeError(f"{len(lines)} error lines on stderr, expected one: {text.strip()[-200:]}")
            raise _CliRefused(lines[-1])
        yield "neuroadda-rt " + " ".join(Path(a).name if "/" in a else a for a in argv), run


class _CliRefused(OSError):
    """Exit status 2 with a one-line error: the CLI's promise, counted as ``typed``."""


# ---------------------------------------------------------------------------------------------------------
# watcher kills
# ---------------------------------------------------------------------------------------------------------
def watcher_cases(tmp: Path):
    def recorded(db: Path) -> list[str]:
        import sqlite3

        if not db.exists():
            return []
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                return [Path(r[0]).name for r in con.execute("select path from files where status = 'ok'")]
            finally:
                con.close()
        except sqlite3.Error:
            return []

    def run(n_kills: int):
        def go():
            import tifffile

            folder = tmp / f"watch{n_kills}"
            folder.mkdir()
            db = tmp / f"watch{n_kills}.qc.sqlite"
            ref = tmp / f"ref{n_kills}.npy"
            rng = np.random.default_rng(n_kills)
            np.save(ref, rng.integers(90, 160, (256, 32, 32), dtype=np.uint8))
            n_files = 12
            cmd = [sys.executable, "-m", "neuroadda_rt", "qc", "watch", str(folder), "--model", str(TINY_MODEL),
                   "--reference", str(ref), "--tile-size", "32", "--settle", "0.3", "--window", "8", "--db", str(db)]
            written = 0
            for k in range(n_kills + 1):
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                before = len(recorded(db))
                for _ in range(n_files // (n_kills + 1)):
                    tifffile.imwrite(folder / f"s{written:03d}.tif", rng.integers(90, 160, (64, 64), dtype=np.uint8))
                    written += 1
                    time.sleep(0.2)
                deadline = time.time() + 120
                if k < n_kills:  # kill while it works: once it has recorded something of this batch
                    while len(recorded(db)) <= before and time.time() < deadline and proc.poll() is None:
                        time.sleep(0.05)
                    proc.send_signal(signal.SIGKILL)
                else:  # the last run: let it finish, then stop it as a user would
                    while len(set(recorded(db))) < written and time.time() < deadline and proc.poll() is None:
                        time.sleep(0.2)
                    proc.send_signal(signal.SIGINT)
                try:
                    _, err = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise RuntimeError("the watcher did not stop on SIGINT") from None
                if k == n_kills and proc.returncode not in (0, -signal.SIGINT, 130):
                    raise RuntimeError(f"watcher exited {proc.returncode}: {err.strip()[-300:]}")
            names = recorded(db)
            if sorted(set(names)) != sorted(f"s{i:03d}.tif" for i in range(written)):
                raise Wrong(f"{len(set(names))} of {written} files recorded after {n_kills} kills")
            if len(names) != len(set(names)):
                raise Wrong("a file was recorded twice")
        return go

    for n_kills in (1, 3):
        yield f"qc watch killed {n_kills}x with SIGKILL and restarted", run(n_kills)


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def _cases(name: str, tmp: Path):
    makers = {"kernels": lambda t: kernel_cases(), "threads": lambda t: thread_cases(), "packages": package_cases,
              "files": file_cases, "cli": cli_cases, "watcher": watcher_cases}
    return makers[name](tmp)


def worker(name: str, start: int) -> int:
    """Run the cases of one class from ``start``, one JSON line before and after each (a crash shows)."""
    import logging

    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as d:
        for i, (label, fn) in enumerate(_cases(name, Path(d))):
            if i < start:
                continue
            print(json.dumps({"i": i, "case": label, "state": "start"}), flush=True)
            try:
                fn()
                exc = None
            except _CliRefused:
                exc = _CliRefused()
            except BaseException as e:  # noqa: BLE001 - every outcome is counted
                exc = e
            out = "typed" if isinstance(exc, _CliRefused) else classify(exc)
            detail = "" if exc is None or out == "typed" else f"{type(exc).__name__}: {str(exc)[:200]}"
            print(json.dumps({"i": i, "case": label, "state": "done", "outcome": out, "detail": detail}),
                  flush=True)
    return 0


def run_class(name: str) -> list[dict]:
    results: list[dict] = []
    start = 0
    while True:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--start", str(start)],
                              capture_output=True, text=True, timeout=1800)
        last_start = None
        for line in proc.stdout.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec["state"] == "start":
                last_start = rec
            else:
                results.append(rec)
                last_start = None
        if proc.returncode == 0:
            return results
        if last_start is None:  # died outside a case
            results.append({"i": start, "case": "(worker)", "outcome": "crash",
                            "detail": f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"})
            return results
        results.append({**last_start, "outcome": "crash", "detail": f"exit {proc.returncode}"})
        start = last_start["i"] + 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(CLASSES), help="comma-separated classes")
    ap.add_argument("--show", default="untyped,wrong,crash", help="outcomes whose cases are listed")
    ap.add_argument("--json", default=None, help="write every case's outcome here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.start)
    show = set(args.show.split(","))
    table, everything = {}, {}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        res = run_class(name)
        everything[name] = res
        table[name] = Counter(r["outcome"] for r in res)
        print(f"{name}: {len(res)} cases in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for r in res:
            if r["outcome"] in show:
                print(f"  [{r['outcome']}] {r['case']}: {r.get('detail', '')}", file=sys.stderr)
    print("| class | cases | " + " | ".join(OUTCOMES) + " |")
    print("|---|---|" + "---|" * len(OUTCOMES))
    for name, c in table.items():
        print(f"| {name} | {sum(c.values())} | " + " | ".join(str(c.get(o, 0)) for o in OUTCOMES) + " |")
    total = sum(table.values(), Counter())
    print(f"| all | {sum(total.values())} | " + " | ".join(str(total.get(o, 0)) for o in OUTCOMES) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
