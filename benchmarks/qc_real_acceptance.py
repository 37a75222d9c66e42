"""Real-acquisition acceptance of the QC monitor (issue 17), printed as Markdown tables.

    python benchmarks/qc_real_acceptance.py [--data DIR] [--cache DIR] [--parts ...] [--json out.json]

The protocol is fixed in ``docs/results.md`` section 3.1 (written before the results were looked at):
the five shared sets in acquisition order, reference = first min(30, ceil(n/4)) sections, stream = the
rest; 64x64 tiles, window 32, alpha 0.01; a random-weight default UNet encoder quantised to int8.
Parts: ``fa`` (false drift alarms on clean streams), ``pairs`` (dataset switch, every ordered pair),
``artefacts`` (clean FP rate, injected kinds, DVID bands), ``alibi`` (alibi-detect side by side),
``alternatives`` (the drift nulls compared in docs/method.md), ``statistics`` (the monitor's three window
statistics only, fast), ``throughput`` (256x256 PNG tiles, int8, and file-written -> reported latency through
the watcher). ``--encoder PACKAGE`` replaces the protocol's encoder (a side experiment, labelled as such).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

TILE = 64
WINDOW = 32
ALPHA = 0.01
ARTEFACT_FPR = 0.01
BAND_ROW_MEAN = 2.0  # a DVID row is black padding when its mean is < 2 of 255
BAND_TILE_FRACTION = 0.25
SETS = ("dvid", "gala", "isbi", "gerhard", "kasthuri")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# data


def _png_u8(path):
    from PIL import Image

    a = np.asarray(Image.open(path))
    return a[..., 0] if a.ndim == 3 else a


def load_acquisitions(root: Path) -> dict[str, dict]:
    """Every acceptance acquisition as {name: {"set", "sections": (n, H, W) uint8}} in z order."""
    from neuroadda_rt.io import natural_sort_key

    def folder(p, pattern):
        files = sorted(p.glob(pattern), key=lambda f: natural_sort_key(f.name))
        if not files:
            raise FileNotFoundError(f"no {pattern} in {p}")
        return np.stack([_png_u8(f) if f.suffix == ".png" else _tif(f) for f in files])

    def _tif(f):
        import tifffile

        a = tifffile.imread(f)
        return a[..., 0] if a.ndim == 3 else a

    def h5(p):
        import h5py

        with h5py.File(p, "r") as f:
            return np.asarray(f["stack"][...], dtype=np.uint8)

    isbi = root / "isbi2012_drosophila_l1_vnc" / "data" / "membrane"
    ger = root / "drosophila_l3_vnc_gerhard"
    gala = root / "drosophila_fibsem_gala_example" / "tests" / "example-data"
    acq = {
        "dvid": ("dvid", lambda: folder(root / "drosophila_fibsem_dvid_grayscale" / "grayscale_maps", "iso.*.png")),
        "gala_train": ("gala", lambda: h5(gala / "train-image.h5")),
        "gala_test": ("gala", lambda: h5(gala / "test-image.h5")),
        "isbi_train": ("isbi", lambda: folder(isbi / "train" / "image", "*.png")),
        "isbi_test": ("isbi", lambda: folder(isbi / "test", "*.png")),
        "gerhard_stack1": ("gerhard", lambda: folder(ger / "stack1" / "raw", "*.tif")),
        "gerhard_stack2": ("gerhard", lambda: folder(ger / "stack2" / "raw", "*.tif")),
        "kasthuri": ("kasthuri", lambda: folder(root / "kasthuri_mouse_cortex_uniem" / "data" / "DNN_test_images",
                                                "*.png")),
    }
    return {name: {"set": s, "sections": fn()} for name, (s, fn) in acq.items()}


def n_reference_sections(n: int) -> int:
    """The protocol's rule: the first min(30, ceil(n / 4)) sections are the reference."""
    return min(30, math.ceil(n / 4))


def tiles_of(sections: np.ndarray):
    """(tiles, section index per tile) with 64x64 row-major tiles per section."""
    from neuroadda_rt.qc import split_tiles

    t = split_tiles(sections, TILE)
    per = len(t) // len(sections)
    return t, np.repeat(np.arange(len(sections)), per)


def band_rows(sections: np.ndarray) -> np.ndarray:
    """(n, H) bool: rows whose mean is < 2 of 255 (DVID black padding)."""
    return sections.astype(np.float64).mean(axis=2) < BAND_ROW_MEAN


def band_tiles(sections: np.ndarray) -> np.ndarray:
    """Per 64x64 tile (split_tiles order): True when >= 25% of its rows are band rows."""
    rows = band_rows(sections)
    n, h, w = sections.shape
    gh, gw = h // TILE, w // TILE
    frac = rows[:, :gh * TILE].reshape(n, gh, TILE).mean(axis=2)  # (n, gh)
    return np.repeat(frac >= BAND_TILE_FRACTION, gw, axis=1).reshape(-1)


def padding_column_tiles(sections: np.ndarray) -> np.ndarray:
    """Per 64x64 tile: True when a whole column of the tile lies in a black padding column of its
    section (column mean < 2). Not part of the fixed protocol: the DVID stack also has black padding
    columns 1-10 px wide at the left edge of 47 sections the row rule calls clean (seen in the
    flagged tiles after the run), reported separately."""
    cols = sections.astype(np.float64).mean(axis=1) < BAND_ROW_MEAN  # (n, W)
    n, h, w = sections.shape
    gh, gw = h // TILE, w // TILE
    per = cols[:, :gw * TILE].reshape(n, gw, TILE).any(axis=2)  # (n, gw)
    return np.repeat(per[:, None, :], gh, axis=1).reshape(-1)


def prepare(root: Path) -> dict[str, dict]:
    """Acquisitions cut into reference and stream tiles, with section ids and clean masks."""
    out = {}
    for name, a in load_acquisitions(root).items():
        secs = a["sections"]
        k = n_reference_sections(len(secs))
        tiles, sec = tiles_of(secs)
        clean_sec = ~band_rows(secs).any(axis=1)
        band = band_tiles(secs) if name == "dvid" else np.zeros(len(tiles), bool)
        ref = sec < k
        out[name] = {"set": a["set"], "tiles": tiles, "section": sec, "ref": ref, "k": k, "n_sections": len(secs),
                     "clean": clean_sec[sec], "band": band, "padcol": padding_column_tiles(secs)}
        log(f"{name}: {len(secs)} sections {secs.shape[1:]}, K={k}, {ref.sum()} reference / {(~ref).sum()} "
            f"stream tiles, {band.sum()} band tiles")
    return out


# ----------------------------------------------------------------------------------------------
# encoder and cached features


def synthetic_tiles(n: int, size: int, seed0: int) -> np.ndarray:
    from neuroadda_rt.study.synthetic import make_domain

    out, i = [], 0
    while sum(len(o) for o in out) < n:
        img, _ = make_domain(None, (256, 256), seed=seed0 + i)
        k = 256 // size
        out.append(img.reshape(k, size, k, size).transpose(0, 2, 1, 3).reshape(k * k, size, size))
        i += 1
    return np.concatenate(out)[:n]


def build_encoder(cache: Path) -> tuple[Path, Path]:
    """The default UNet (seed 0, random weights) encoder, fp32 and int8 (calibrated on synthetic tiles)."""
    import torch

    import neuroadda_rt as nr
    from neuroadda_rt.models import UNet

    fp32, int8 = cache / "encoder.onnx", cache / "encoder.int8.onnx"
    if not int8.is_file():
        torch.manual_seed(0)
        nr.export_onnx(UNet().eval(), fp32, part="encoder")
        nr.quantize_int8(fp32, synthetic_tiles(32, TILE, 900).astype(np.float32) / 255, int8)
    return fp32, int8


class FeatureCache:
    """Features of tiles keyed by their bytes (so that the experiments replay tiles cheaply)."""

    def __init__(self, fx, path: Path):
        self.fx, self.path, self.store = fx, path, {}
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                self.store = {k.tobytes(): f for k, f in zip(z["keys"], z["features"])}
        self.dirty = False

    @staticmethod
    def key(t):
        return hashlib.blake2b(np.ascontiguousarray(t).tobytes(), digest_size=16).digest()

    def __call__(self, tiles):
        """Encoder callable for QCMonitor: (N, H, W) float32 in [0, 1] -> (N, d)."""
        keys = [self.key(t) for t in tiles]
        miss = [i for i, k in enumerate(keys) if k not in self.store]
        for s in range(0, len(miss), 512):
            idx = miss[s:s + 512]
            f = self.fx.features(tiles[idx][:, None], batch_size=64)
            for i, fi in zip(idx, f):
                self.store[keys[i]] = fi
            self.dirty = True
            if len(miss) > 512:
                log(f"  features {s + len(idx)}/{len(miss)}")
        return np.stack([self.store[k] for k in keys])

    def save(self):
        if not self.dirty:
            return
        keys = np.stack([np.frombuffer(k, dtype=np.uint8) for k in self.store])
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=keys, features=np.stack(list(self.store.values())))
        os.replace(tmp, self.path)
        self.dirty = False


class PerReferenceEncoder:
    """A package's encoder quantised to int8 on each acquisition's own reference tiles, as ``qc watch
    --precision int8`` does (one extractor and one feature cache per reference)."""

    def __init__(self, package: Path, cache: Path):
        self.package, self.cache, self.encoders = package, cache, {}

    def for_reference(self, ref_tiles: np.ndarray) -> FeatureCache:
        from neuroadda_rt import FeatureExtractor
        from neuroadda_rt.qc.descriptors import as_tiles

        key = FeatureCache.key(ref_tiles).hex()[:12]
        if key not in self.encoders:
            fx = FeatureExtractor(self.package, precision="int8", calibration_tiles=as_tiles(ref_tiles), threads=2)
            self.encoders[key] = FeatureCache(fx, self.cache / f"features_{self.package.name}_int8_{key}.npz")
        return self.encoders[key]

    def save(self):
        for e in self.encoders.values():
            e.save()


# ----------------------------------------------------------------------------------------------
# injected artefacts (generation fixed in docs/results.md 3.1)

KINDS = ("fold", "stain", "blur", "saturation", "black_stripe")
EXPECTED_CAUSE = {"fold": "fold", "stain": "stain", "blur": "defocus", "saturation": "saturation",
                  "black_stripe": "black_region"}


def inject(tile: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """One artefact on a uint8 tile (a new uint8 tile)."""
    from neuroadda_rt.study.synthetic import apply_artefact

    if kind in ("fold", "stain", "blur"):
        return apply_artefact(tile, {"blur": "defocus"}.get(kind, kind), seed=seed)[0]
    rng = np.random.default_rng(seed)
    x = tile.astype(np.float32) / 255
    h, w = x.shape
    if kind == "saturation":
        # a half-plane covering 30-100% of the tile: intensities -> min(1, 1.8 x + 0.3)
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        proj = (yy - h / 2) * math.sin(ang) + (xx - w / 2) * math.cos(ang)
        cut = np.quantile(proj, 1 - rng.uniform(0.3, 1.0))
        m = proj >= cut
        x[m] = np.minimum(1.0, 1.8 * x[m] + 0.3)
    elif kind == "black_stripe":
        vertical = rng.random() < 0.5
        size = h if not vertical else w
        width = int(round(rng.uniform(0.25, 0.6) * size))
        start = int(rng.integers(0, size - width + 1))
        noise = np.abs(rng.normal(0, 0.004, size=(h, w))).astype(np.float32)
        if vertical:
            x[:, start:start + width] = noise[:, start:start + width]
        else:
            x[start:start + width] = noise[start:start + width]
    else:
        raise ValueError(kind)
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def injected_set(acq: dict, n: int = 100):
    """{kind: (tiles, source index)} from the acquisition's clean stream tiles (rng 17; seed 1000 + i)."""
    idx = np.flatnonzero(~acq["ref"] & acq["clean"])
    rng = np.random.default_rng(17)
    pick = np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False))
    return {k: np.stack([inject(acq["tiles"][j], k, 1000 + i) for i, j in enumerate(pick)]) for k in KINDS}, pick


# ----------------------------------------------------------------------------------------------
# experiments


def monitor_for(enc, acq, **kw):
    import warnings

    from neuroadda_rt import QCMonitor
    from neuroadda_rt.qc import QCCalibrationWarning

    if isinstance(enc, PerReferenceEncoder):
        enc = enc.for_reference(acq["tiles"][acq["ref"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QCCalibrationWarning)
        mon = QCMonitor(enc, acq["tiles"][acq["ref"]], reference_groups=acq["section"][acq["ref"]], window=WINDOW,
                        alpha=ALPHA, artefact_fpr=ARTEFACT_FPR, **kw)
    return mon, [str(w.message) for w in caught]


def false_alarms(enc, data):
    """Per stream: windows of clean sections, alarms; band windows separately; tile flags."""
    rows, flags_all = {}, {}
    for name, a in data.items():
        mon, warns = monitor_for(enc, a)
        st = ~a["ref"]
        tiles, clean, band = a["tiles"][st], a["clean"][st], a["band"][st]
        rep = mon.update(tiles, timestamp=0.0)
        ws = rep.windows
        wclean = np.array([clean[w.index * WINDOW:(w.index + 1) * WINDOW].all() for w in ws], bool)
        alarms = np.array([w.drift for w in ws], bool)
        rows[name] = {"windows_clean": int(wclean.sum()), "alarms_clean": int((alarms & wclean).sum()),
                      "windows_band": int((~wclean).sum()), "alarms_band": int((alarms & ~wclean).sum()),
                      "tested": mon.drift_note == "", "note": mon.drift_note, "warnings": warns,
                      "threshold": mon.threshold, "calibration_windows": int(len(mon._cal)),
                      "calibration_length": int(mon.calibration_length),
                      "novelty_threshold": float(mon.novelty_threshold),
                      "clean_tiles": int(clean.sum()), "clean_flagged": int(rep.flags[clean].sum()),
                      "flag_kinds_clean": _count([k for k, c in zip(rep.kinds, clean) if c and k])}
        nopad = clean & ~a["padcol"][st]
        rows[name]["clean_nopad_tiles"] = int(nopad.sum())
        rows[name]["clean_nopad_flagged"] = int(rep.flags[nopad].sum())
        if band.any():
            kinds = [k for k, b in zip(rep.kinds, band) if b and k]
            rows[name]["band_tiles"] = int(band.sum())
            rows[name]["band_flagged"] = int(rep.flags[band].sum())
            rows[name]["band_kinds"] = _count(kinds)
        flags_all[name] = rep
        log(name, {k: v for k, v in rows[name].items() if k != "warnings"})
    return rows


def _count(xs):
    out = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


FIRST = {"dvid": "dvid", "gala": "gala_train", "isbi": "isbi_train", "gerhard": "gerhard_stack1",
         "kasthuri": "kasthuri"}


def pair_stream(data, a_name, b_name):
    a, b = data[a_name], data[b_name]
    pre = a["tiles"][~a["ref"]][:4 * WINDOW]
    return np.concatenate([pre, b["tiles"]]), len(pre)


def switch_pairs(enc, data, detector=None):
    """Delay (windows) to the first alarm after the switch A -> B, every ordered pair of sets."""
    out = {}
    for sa in SETS:
        for sb in SETS:
            if sa == sb:
                continue
            a_name, b_name = FIRST[sa], FIRST[sb]
            stream, n_pre = pair_stream(data, a_name, b_name)
            if detector is None:
                mon, _ = monitor_for(enc, data[a_name])
                if mon.drift_note:
                    out[(sa, sb)] = {"delay": None, "pre_alarms": None, "note": "reference too small"}
                    continue
                alarms = [w.drift for w in mon.update(stream, timestamp=0.0).windows]
            else:
                alarms = detector(data[a_name], stream)
                if alarms is None:
                    out[(sa, sb)] = {"delay": None, "pre_alarms": None, "note": "reference too small"}
                    continue
            k0 = n_pre // WINDOW
            post = alarms[k0:]
            delay = next((i + 1 for i, x in enumerate(post) if x), None)
            out[(sa, sb)] = {"delay": delay, "pre_alarms": int(sum(alarms[:k0])), "windows_after": len(post)}
    return out


def artefact_recall(enc, data):
    res = {k: {"n": 0, "flagged": 0, "cause_right": 0, "causes": {}} for k in KINDS}
    for name, a in data.items():
        mon, _ = monitor_for(enc, a)
        inj, _ = injected_set(a)
        for k, tiles in inj.items():
            rep = mon.update(tiles, timestamp=0.0)
            r = res[k]
            r["n"] += len(tiles)
            r["flagged"] += int(rep.flags.sum())
            r["cause_right"] += sum(1 for kk, f in zip(rep.kinds, rep.flags) if f and kk == EXPECTED_CAUSE[k])
            for kk in rep.kinds:
                if kk:
                    r["causes"][kk] = r["causes"].get(kk, 0) + 1
            r.setdefault("per_stream", {})[name] = round(float(rep.flags.mean()), 3)
    for k, r in res.items():
        r["recall"] = r["flagged"] / max(r["n"], 1)
        r["cause_accuracy"] = r["cause_right"] / max(r["flagged"], 1)
        log(k, r)
    return res


# ----------------------------------------------------------------------------------------------
# alternatives and alibi-detect on the same streams


def features_of(enc, tiles):
    return enc(tiles.astype(np.float32) / 255)


def _stream_windows(feats):
    return [feats[i:i + WINDOW] for i in range(0, len(feats) - WINDOW + 1, WINDOW)]


def monitor_detector(statistic):
    def run(acq, stream_tiles, enc):
        import warnings

        from neuroadda_rt import QCMonitor
        from neuroadda_rt.qc import QCCalibrationWarning

        # the reference as features: the same drift calibration without the artefact descriptors (faster)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QCCalibrationWarning)
            mon = QCMonitor(enc, features_of(enc, acq["tiles"][acq["ref"]]), window=WINDOW, alpha=ALPHA,
                            reference_groups=acq["section"][acq["ref"]], statistic=statistic)
        if mon.drift_note:
            return None
        return [w.drift for w in mon.update(stream_tiles, timestamp=0.0).windows]
    return run


def iid_permutation_detector(acq, stream_tiles, enc, n_perm=200):
    """The old test: each window against the whole reference, exact permutation p-value of the pooled
    sample (windows treated as exchangeable with the reference), alarm at p <= alpha."""
    from neuroadda_rt import mmd2_test
    from neuroadda_rt.mmd import median_sigma

    ref = features_of(enc, acq["tiles"][acq["ref"]])
    rng = np.random.default_rng(0)
    p = rng.permutation(len(ref))
    sigma = float(median_sigma(ref[p[:len(ref) // 2]], ref[p[len(ref) // 2:]]))
    return [mmd2_test(w, ref, n_permutations=n_perm, sigma=sigma, seed=i).p_value <= ALPHA
            for i, w in enumerate(_stream_windows(features_of(enc, stream_tiles)))]


def alibi_detector(kind, max_windows=None, n_permutations=100):
    def run(acq, stream_tiles, enc):
        import warnings

        from neuroadda_rt.mmd import median_sigma

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from alibi_detect.cd import LSDDDrift, MMDDrift

            ref = features_of(enc, acq["tiles"][acq["ref"]]).astype(np.float32)
            rng = np.random.default_rng(0)
            p = rng.permutation(len(ref))
            sigma = float(median_sigma(ref[p[:len(ref) // 2]], ref[p[len(ref) // 2:]]))
            if kind == "MMDDrift":
                cd = MMDDrift(ref, backend="pytorch", p_val=ALPHA, sigma=np.array([sigma], np.float32),
                              configure_kernel_from_x_ref=False, n_permutations=n_permutations, device="cpu")
            else:
                cd = LSDDDrift(ref, backend="pytorch", p_val=ALPHA, n_permutations=n_permutations, device="cpu")
            wins = _stream_windows(features_of(enc, stream_tiles).astype(np.float32))
            if max_windows is not None:
                wins = wins[:max_windows]
            return [bool(cd.predict(w)["data"]["is_drift"]) for w in wins]
    return run


def compare(enc, data, detectors: dict, pair_windows: int | None = None, fa_windows: int | None = None,
            stateless: bool = False):
    """False alarms on the clean windows of every acquisition and the delay of every ordered pair, for
    each detector (a function (acq, stream tiles, enc) -> alarms per window, or None when it refuses).

    ``fa_windows`` keeps that many windows of each stream, evenly spread, and ``pair_windows`` the first
    windows after a switch (a reduced run, for slow detectors); ``stateless`` (a detector that tests
    every window on its own against a fixed reference) skips the pre-switch windows of a pair, whose
    alarms do not enter the delay."""
    out = {}
    for label, det in detectors.items():
        t0 = time.perf_counter()
        fa_n = fa_k = 0
        per = {}
        for name, a in data.items():
            st = np.flatnonzero(~a["ref"])
            if fa_windows is not None:
                # windows spread evenly over the stream (each one whole and aligned), so that a long
                # stream's late sections count as much as its first ones
                n_win = len(st) // WINDOW
                keep = np.unique(np.linspace(0, n_win - 1, min(fa_windows, n_win)).round().astype(int))
                st = st[(keep[:, None] * WINDOW + np.arange(WINDOW)).reshape(-1)]
            alarms = det(a, a["tiles"][st], enc)
            if alarms is None:
                per[name] = None
                continue
            clean = a["clean"][st]
            wc = [clean[i * WINDOW:(i + 1) * WINDOW].all() for i in range(len(alarms))]
            n, k = sum(wc), sum(x for x, c in zip(alarms, wc) if c)
            per[name] = (k, n)
            fa_n, fa_k = fa_n + n, fa_k + k
            log(f"  {label} {name}: {k}/{n} clean windows alarmed ({time.perf_counter() - t0:.0f} s)")
        pairs = {}
        for sa in SETS:
            for sb in SETS:
                if sa == sb:
                    continue
                stream, n_pre = pair_stream(data, FIRST[sa], FIRST[sb])
                if pair_windows is not None:
                    stream = stream[:n_pre + pair_windows * WINDOW]
                if stateless:
                    stream, n_pre = stream[n_pre:], 0
                alarms = det(data[FIRST[sa]], stream, enc)
                if alarms is None:
                    pairs[f"{sa}->{sb}"] = None
                    continue
                k0 = n_pre // WINDOW
                pairs[f"{sa}->{sb}"] = next((i + 1 for i, x in enumerate(alarms[k0:]) if x), None)
        out[label] = {"fa": (fa_k, fa_n), "per_stream": per, "pairs": pairs, "seconds": time.perf_counter() - t0}
        log(label, out[label])
    return out


# ----------------------------------------------------------------------------------------------
# throughput and latency


def extractor_factory(encoder: Path, package_int8: bool = False):
    """A factory ``reference tiles -> FeatureExtractor`` on ONNX Runtime with 2 threads: an ONNX file or
    a package as it is, or (``package_int8``) a package's encoder quantised on the reference tiles."""
    from neuroadda_rt import FeatureExtractor
    from neuroadda_rt.qc.descriptors import as_tiles

    if package_int8:
        return lambda ref: FeatureExtractor(encoder, precision="int8", calibration_tiles=as_tiles(ref), threads=2)
    return lambda ref: FeatureExtractor(encoder, backend="onnxruntime", threads=2)


def throughput(int8: Path, n_tiles=512, batch=64, make_extractor=None):
    """QCMonitor.update end to end on PNG-encoded 256x256 tiles (decode, normalise, int8 features,
    descriptors, scores, window tests), ONNX Runtime on 2 threads."""
    from PIL import Image

    from neuroadda_rt import QCMonitor

    make_extractor = make_extractor or extractor_factory(int8)
    ref = synthetic_tiles(1024, 256, 1000)
    src = synthetic_tiles(n_tiles, 256, 5000)
    pngs = []
    for t in src:
        buf = io.BytesIO()
        Image.fromarray(t).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    fx = make_extractor(ref)
    mon = QCMonitor(fx, ref, window=256)
    mon.update(np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in pngs[:batch]]))  # warm-up
    lat = []
    t0 = time.perf_counter()
    c0 = time.process_time()
    for s in range(0, n_tiles, batch):
        t1 = time.perf_counter()
        mon.update(np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in pngs[s:s + batch]]))
        lat.append(time.perf_counter() - t1)
    dt = time.perf_counter() - t0
    return {"tiles_per_s": n_tiles / dt, "ms_per_update_of_64": 1e3 * float(np.median(lat)),
            "ms_max": 1e3 * float(np.max(lat)), "cpu_ms_per_tile": 1e3 * (time.process_time() - c0) / n_tiles,
            "load_avg": os.getloadavg()[0]}


def watcher_latency(int8: Path, n_files=8, tiles_per_file=16, settle=0.5, make_extractor=None):
    """Seconds from a file's write (atomic rename into the folder) to its summary line, live watcher."""
    import tempfile
    import threading

    from PIL import Image

    from neuroadda_rt import QCMonitor
    from neuroadda_rt.qc import QCService

    ref = synthetic_tiles(512, 256, 1000)
    fx = (make_extractor or extractor_factory(int8))(ref)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "acq"
        folder.mkdir()
        seen = {}

        def echo(line):
            name = line.split()[1].rstrip(":") if len(line.split()) > 1 else ""
            seen.setdefault(name, time.time())

        svc = QCService(folder, lambda: QCMonitor(fx, ref, window=64), fx, settle=settle, echo=echo, tile_size=256)
        th = threading.Thread(target=svc.run, kwargs={"poll": 0.05, "timeout": 60 + 5 * n_files})
        th.start()
        written = {}
        try:
            time.sleep(1.0)
            for i in range(n_files):
                img = np.concatenate(list(synthetic_tiles(tiles_per_file, 256, 7000 + 16 * i)), axis=1)
                part = folder / f".f{i:03d}.png.part"
                Image.fromarray(img).save(part, format="PNG")
                os.replace(part, folder / f"f{i:03d}.png")
                written[f"f{i:03d}.png"] = time.time()
                time.sleep(2.0)
            deadline = time.time() + 30
            while len([k for k in written if k in seen]) < n_files and time.time() < deadline:
                time.sleep(0.1)
        finally:
            svc.stop()
            th.join()
            svc.close()
    lat = [seen[k] - t for k, t in written.items() if k in seen]
    return {"files": n_files, "tiles_per_file": tiles_per_file, "settle_s": settle,
            "latency_s_median": float(np.median(lat)) if lat else None,
            "latency_s_max": float(np.max(lat)) if lat else None, "reported": len(lat)}


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("NEUROADDA_DATA", "../shared/em_data")))
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("NEUROADDA_QC_CACHE", "/tmp/neuroadda_qc_real")))
    ap.add_argument("--parts", default="fa,pairs,artefacts,alternatives,alibi,throughput")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--encoder", type=Path, default=None,
                    help="a model package or encoder ONNX instead of the protocol's random int8 encoder (a side "
                         "experiment, not the protocol)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                    help="with --encoder PACKAGE: int8 quantises the package's encoder on each acquisition's "
                         "reference tiles (as `qc watch --precision int8`), also for the throughput part")
    ap.add_argument("--alibi-permutations", type=int, default=100, help="alibi-detect permutations (protocol: 100)")
    ap.add_argument("--alibi-fa-windows", type=int, default=None,
                    help="alibi-detect: N windows of each stream, evenly spread (a reduced run; default all)")
    ap.add_argument("--alibi-pair-windows", type=int, default=6, help="alibi-detect: windows after a switch")
    args = ap.parse_args(argv)
    if args.precision == "int8" and args.encoder is None:
        ap.error("--precision int8 quantises a package's encoder: give --encoder PACKAGE")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from neuroadda_rt import FeatureExtractor

    parts = set(args.parts.split(","))
    args.cache.mkdir(parents=True, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
           platform.machine(), "cpus": os.cpu_count(), "load_start": os.getloadavg()[0]}
    data = prepare(args.data)
    _fp32, int8 = build_encoder(args.cache)
    if args.encoder is None:
        enc = FeatureCache(FeatureExtractor(int8, backend="onnxruntime", threads=2), args.cache / "features.npz")
    elif args.precision == "int8":  # a package's encoder quantised on each reference (qc watch --precision int8)
        res["encoder"] = f"{args.encoder} (int8, calibrated on each reference)"
        if parts & {"statistics", "alternatives", "alibi"}:
            ap.error("--precision int8 runs the parts fa, pairs, artefacts, throughput")
        enc = PerReferenceEncoder(args.encoder, args.cache)
    else:  # not the protocol's encoder: a trained model package (its own intensity rule), for a side experiment
        res["encoder"] = str(args.encoder)
        enc = FeatureCache(FeatureExtractor(args.encoder, backend="onnxruntime", threads=2),
                           args.cache / f"features_{args.encoder.name}.npz")
    try:
        if "fa" in parts:
            res["fa"] = false_alarms(enc, data)
        if "pairs" in parts:
            res["pairs"] = {f"{a}->{b}": v for (a, b), v in switch_pairs(enc, data).items()}
        if "artefacts" in parts:
            res["artefacts"] = artefact_recall(enc, data)
        if "statistics" in parts:
            # the monitor's three window statistics on every window (each window on its own: fast)
            res["statistics"] = compare(enc, data, {f"{st}, calibrated": monitor_detector(st)
                                                    for st in ("novelty", "mmd2", "both")}, stateless=True)
        if "alternatives" in parts:
            res["alternatives"] = compare(enc, data, {
                "novelty (default)": lambda a, s, e: monitor_detector("novelty")(a, s, e),
                "mmd2, calibrated": lambda a, s, e: monitor_detector("mmd2")(a, s, e),
                "both (alpha/2 each)": lambda a, s, e: monitor_detector("both")(a, s, e),
                "mmd2, iid permutation null (old)": iid_permutation_detector})
        if "alibi" in parts:
            try:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    import alibi_detect  # noqa: F401
                perm = args.alibi_permutations
                # the monitor's own statistics on the very same (possibly reduced) windows, for the side by side
                dets = {"monitor novelty (default)": monitor_detector("novelty"),
                        "monitor mmd2, calibrated": monitor_detector("mmd2"),
                        "alibi MMDDrift": alibi_detector("MMDDrift", n_permutations=perm),
                        "alibi LSDDDrift": alibi_detector("LSDDDrift", n_permutations=perm)}
                res["alibi_settings"] = {"permutations": perm, "fa_windows": args.alibi_fa_windows,
                                         "pair_windows": args.alibi_pair_windows}
                res["alibi"] = compare(enc, data, dets, pair_windows=args.alibi_pair_windows,
                                       fa_windows=args.alibi_fa_windows, stateless=True)
            except ImportError as exc:
                res["alibi"] = {"error": f"alibi-detect not importable: {exc}"}
    finally:
        enc.save()
    if "throughput" in parts:
        # --encoder: that encoder at --precision (a side experiment); else the protocol's int8 encoder
        make = None if args.encoder is None else extractor_factory(args.encoder, package_int8=args.precision == "int8")
        res["throughput"] = throughput(int8, make_extractor=make)
        log(res["throughput"])
        res["latency"] = watcher_latency(int8, make_extractor=make)
        log(res["latency"])
    res["load_end"] = os.getloadavg()[0]
    print(render(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


def _rate(k, n):
    return f"{k}/{n} ({k / n:.3f})" if n else "-"


def render(r) -> str:
    out = [f"QC real-acquisition acceptance ({r['date']}, {r['machine']}, {r['cpus']} cpus, load "
           f"{r['load_start']:.1f} -> {r['load_end']:.1f}); 64x64 tiles, window {WINDOW}, alpha {ALPHA}, "
           f"artefact_fpr {ARTEFACT_FPR}", ""]
    if "fa" in r:
        out += ["| acquisition | drift calibrated | clean windows: alarms | band windows: alarms | clean tiles: flagged "
                "(causes) | band tiles: flagged (causes) |", "|---|---|---|---|---|---|"]
        tk = tn = fk = fn = bk = bn = pk = pn = 0
        for name, v in r["fa"].items():
            tested = "yes" if v["tested"] else f"no ({v['calibration_windows']} calibration windows)"
            if v["tested"] and v.get("calibration_length", WINDOW) < WINDOW:
                tested = f"on {v['calibration_windows']} runs of {v['calibration_length']} tiles"
            wa = _rate(v["alarms_clean"], v["windows_clean"]) if v["tested"] else "not tested"
            band = _rate(v["band_flagged"], v["band_tiles"]) + f" {v['band_kinds']}" if "band_tiles" in v else "-"
            out.append(f"| {name} | {tested} | {wa} | {_rate(v['alarms_band'], v['windows_band']) if v['tested'] else '-'}"
                       f" | {_rate(v['clean_flagged'], v['clean_tiles'])} {v['flag_kinds_clean']} | {band} |")
            if v["tested"]:
                tk, tn = tk + v["alarms_clean"], tn + v["windows_clean"]
            fk, fn = fk + v["clean_flagged"], fn + v["clean_tiles"]
            pk, pn = pk + v.get("clean_nopad_flagged", 0), pn + v.get("clean_nopad_tiles", 0)
            bk, bn = bk + v.get("band_flagged", 0), bn + v.get("band_tiles", 0)
        out += ["", f"- false drift alarms per clean window, pooled over the tested streams: {_rate(tk, tn)} "
                f"(target <= {2 * ALPHA})",
                f"- artefact flags on clean real tiles: {_rate(fk, fn)} (target <= 0.02)",
                f"- (post hoc, not the protocol's number) the same without the DVID tiles that hold black padding "
                f"columns: {_rate(pk, pn)}",
                f"- DVID black-band tiles flagged: {_rate(bk, bn)} (target >= 0.9)", ""]
    if "pairs" in r:
        out += ["| reference set -> switched to | " + " | ".join(SETS) + " |", "|---|" + "---|" * len(SETS)]
        for sa in SETS:
            cells = []
            for sb in SETS:
                if sa == sb:
                    cells.append("")
                    continue
                v = r["pairs"][f"{sa}->{sb}"]
                cells.append(v.get("note", "") if v["delay"] is None and v.get("note") else
                             ("not within %d" % v["windows_after"] if v["delay"] is None else str(v["delay"])))
            out.append(f"| {sa} | " + " | ".join(cells) + " |")
        ok = sum(1 for v in r["pairs"].values() if v["delay"] is not None and v["delay"] <= 3)
        out += ["", f"- ordered pairs detected within 3 windows: {ok} of {len(r['pairs'])}", ""]
    if "artefacts" in r:
        out += ["| injected kind | tiles | recall | likely cause right | causes named |", "|---|---|---|---|---|"]
        for k, v in r["artefacts"].items():
            out.append(f"| {k} | {v['n']} | {v['recall']:.3f} | {v['cause_accuracy']:.3f} | {v['causes']} |")
        out.append("")
    if "encoder" in r:
        out += [f"ENCODER {r['encoder']} (not the protocol's random int8 encoder)", ""]
    for key in ("statistics", "alternatives", "alibi"):
        if key not in r or "error" in r.get(key, {}):
            if key in r:
                out.append(f"- {key}: {r[key]['error']}")
            continue
        if key == "alibi" and "alibi_settings" in r:
            st = r["alibi_settings"]
            out += [f"alibi-detect side by side: {st['permutations']} permutations, "
                    f"{st['fa_windows'] or 'all'} windows of each stream (evenly spread), {st['pair_windows']} windows after "
                    f"each switch" + (" (REDUCED run, not the protocol's full size)" if st["fa_windows"] or
                                      st["permutations"] != 100 else ""), ""]
        out += [f"| {key}: detector | false alarms per clean window | pairs within 3 windows | delays (A->B) | "
                f"seconds |", "|---|---|---|---|---|"]
        for label, v in r[key].items():
            d = v["pairs"]
            ok = sum(1 for x in d.values() if x is not None and x <= 3)
            delays = ", ".join(f"{p}:{'-' if x is None else x}" for p, x in d.items())
            out.append(f"| {label} | {_rate(*v['fa'])} | {ok} of {len(d)} | {delays} | {v['seconds']:.0f} |")
        out.append("")
    if "throughput" in r:
        t, lt = r["throughput"], r["latency"]
        out.append(f"- throughput, {r.get('encoder', 'protocol int8 encoder')} on 2 threads, 256x256 PNG tiles end to end, updates of 64: "
                   f"{t['tiles_per_s']:.1f} tiles/s ({t['ms_per_update_of_64']:.0f} ms per update, max {t['ms_max']:.0f};"
                   f" {t['cpu_ms_per_tile']:.1f} CPU-ms per tile; load {t['load_avg']:.1f}) (target >= 100)")
        out.append(f"- latency file written -> summary line (live watcher, settle {lt['settle_s']} s, "
                   f"{lt['tiles_per_file']} tiles per file): median {_seconds(lt['latency_s_median'])}, max "
                   f"{_seconds(lt['latency_s_max'])} ({lt['reported']} of {lt['files']} files)")
    return "\n".join(out)


def _seconds(value) -> str:
    """A latency in seconds to 2 decimals, or "none" when no file was reported."""
    return "none" if value is None else f"{value:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
