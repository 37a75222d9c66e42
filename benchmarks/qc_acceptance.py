"""Acceptance numbers for acquisition-time QC on synthetic tiles (issue 7), printed as a Markdown table.

The real-acquisition acceptance (issue 17: stacks in acquisition order, where the windows are not
exchangeable with the reference) is ``benchmarks/qc_real_acceptance.py``; this one draws windows at random
from the reference's pool, so it cannot show false alarms caused by consecutive sections.

    python benchmarks/qc_acceptance.py [--cache DIR] [--parts fa,drift,artefacts,throughput]
                                       [--quick] [--json out.json]

Set-up (all synthetic, from :mod:`neuroadda_rt.study.synthetic`):

* **encoder**: the default UNet (16-32-64-128, seed 0, random initialisation: no pretrained
  EM model ships with the package) exported with :func:`~neuroadda_rt.export_onnx` and
  quantised with :func:`~neuroadda_rt.quantize_int8` (calibrated on 32 reference tiles); the
  int8 encoder is the one monitored.
* **tiles**: 256x256 uint8 crops of 1024x1024 images of the default style (16 per image, plus
  their transposes). The reference (2048 tiles) and the stream windows are random disjoint
  draws from one pool, so each window is exchangeable with the reference under "no drift".
* **no drift**: 200 windows of 256 tiles, alpha = 0.01, 500 permutations.
* **drifts**: 4 clean windows, then (onset) 3 drifted windows; the delay is the first
  drifted window with an alarm (1 = the first drifted window). Style step: the parameter
  vector moves a fraction ``lam`` of the way to another style of a
  :func:`~neuroadda_rt.study.synthetic.domain_family`; gradual defocus: Gaussian blur of
  ``rate * k`` pixels in the k-th drifted window; contrast change: intensities scaled by
  ``c`` about the pool mean.
* **artefacts**: :func:`~neuroadda_rt.study.synthetic.apply_artefact` on held-out clean tiles; the
  false-positive rate is measured on every non-reference tile of the no-drift run.
* **throughput**: end to end on PNG-encoded tiles (decode, normalise, features, scores,
  window tests) with ``QCMonitor.update`` in batches of 64, ONNX Runtime on 2 threads.

Features of generated tiles are cached (keyed by the tile bytes) so that the statistical
parts do not re-run the encoder on the same tile; throughput uses the real encoder.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

TILE = 256


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# data and models


def tiles_from_images(style, n_images, seed0, image=1024):
    from neuroadda_rt.study.synthetic import make_domain

    k = image // TILE
    out = []
    for i in range(n_images):
        img, _ = make_domain(style, (image, image), seed=seed0 + i)
        out.append(img.reshape(k, TILE, k, TILE).transpose(0, 2, 1, 3).reshape(k * k, TILE, TILE))
    return np.concatenate(out)


def cached(path: Path, fn):
    if path.is_file():
        return np.load(path, allow_pickle=False)
    arr = fn()
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


def build_encoders(cache: Path, calib: np.ndarray):
    import torch

    import neuroadda_rt as nr
    from neuroadda_rt.models import UNet

    fp32, int8 = cache / "encoder.onnx", cache / "encoder.int8.onnx"
    if not int8.is_file():
        torch.manual_seed(0)
        net = UNet().eval()
        nr.export_onnx(net, fp32, part="encoder")
        nr.quantize_int8(fp32, calib.astype(np.float32) / 255, int8)
    return fp32, int8


class CachedEncoder:
    """Wraps a FeatureExtractor; features of a tile already seen come from a dict (keyed by the
    tile's float32 bytes), so the statistical experiments can replay tiles cheaply."""

    def __init__(self, fx, batch_size=32, path: Path | None = None):
        self.fx, self.batch_size, self.store, self.misses, self.path = fx, batch_size, {}, 0, path
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                self.store = {k.tobytes(): f for k, f in zip(z["keys"], z["features"])}

    def save(self):
        if self.path is None or not self.store:
            return
        keys = np.stack([np.frombuffer(k, dtype=np.uint8) for k in self.store])
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=keys, features=np.stack(list(self.store.values())))
        os.replace(tmp, self.path)

    @staticmethod
    def key(t):
        return hashlib.blake2b(np.ascontiguousarray(t, dtype=np.float32).tobytes(), digest_size=16).digest()

    def warm(self, tiles_u8):
        x = tiles_u8.astype(np.float32) * np.float32(1 / 255)
        todo = [i for i in range(len(x)) if self.key(x[i]) not in self.store]
        for s in range(0, len(todo), 256):
            idx = todo[s:s + 256]
            f = self.fx.features(x[idx][:, None], batch_size=self.batch_size)
            for i, fi in zip(idx, f):
                self.store[self.key(x[i])] = fi
            log(f"  features {s + len(idx)}/{len(todo)}")
            if (s // 256) % 8 == 7:
                self.save()
        if todo:
            self.save()

    def __call__(self, tiles):
        keys = [self.key(t) for t in tiles]
        miss = [i for i, k in enumerate(keys) if k not in self.store]
        if miss:
            self.misses += len(miss)
            f = self.fx.features(tiles[miss][:, None], batch_size=self.batch_size)
            for i, fi in zip(miss, f):
                self.store[keys[i]] = fi
        return np.stack([self.store[k] for k in keys])


# ----------------------------------------------------------------------------------------------
# experiments


def no_drift(enc, ref, pool, n_windows, window, alpha, n_perm, seed=0):
    from neuroadda_rt import QCMonitor

    rng = np.random.default_rng(seed)
    mon = QCMonitor(enc, ref, window=window, alpha=alpha, seed=seed)
    flags = 0
    t = time.perf_counter()
    for _ in range(n_windows):
        rep = mon.update(pool[rng.choice(len(pool), window, replace=False)])
        flags += int(rep.flags.sum())
    dt = time.perf_counter() - t
    ws = mon.windows
    n_alarm = sum(w.drift for w in ws)
    return {"windows": len(ws), "alarms": n_alarm, "fraction": n_alarm / len(ws),
            "p_below_alpha": float(np.mean([w.p_value <= alpha for w in ws])),
            "tile_fpr": flags / (n_windows * window), "seconds": dt}, mon


def run_drift(enc, ref, pool, drifted_windows, window, alpha, n_perm, seed):
    """4 clean windows, then the drifted ones; returns (delay or None, pre-onset alarms)."""
    from neuroadda_rt import QCMonitor

    rng = np.random.default_rng(seed)
    mon = QCMonitor(enc, ref, window=window, alpha=alpha, seed=seed)
    pre = 0
    for _ in range(4):
        pre += mon.update(pool[rng.choice(len(pool), window, replace=False)]).drift
    for k, tiles in enumerate(drifted_windows(rng), start=1):
        rep = mon.update(tiles)
        if rep.drift:
            return k, pre, rep.windows[-1]
    return None, pre, None


def blur_u8(tiles, sigma):
    from scipy import ndimage

    x = ndimage.gaussian_filter(tiles.astype(np.float32), (0, sigma, sigma), truncate=3.0)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def contrast_u8(tiles, c, center):
    return np.clip(np.rint((tiles.astype(np.float32) - center) * c + center), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("NEUROADDA_QC_CACHE", "/tmp/neuroadda_qc_cache")))
    ap.add_argument("--parts", default="fa,drift,artefacts,throughput")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=3, help="repetitions per drift setting")
    ap.add_argument("--artefact-fpr", type=float, default=0.01, help="QCMonitor artefact_fpr for the artefact part")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from neuroadda_rt import FeatureExtractor, QCMonitor
    from neuroadda_rt.study.synthetic import DomainStyle, apply_artefact, domain_family

    parts = set(args.parts.split(","))
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    q = args.quick
    n_images = 24 if q else 160
    window, alpha, n_perm = (64, 0.01, 200) if q else (256, 0.01, 500)
    n_ref = 512 if q else 2048
    n_windows = 40 if q else 200
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
               platform.machine(), "cpus_visible": os.cpu_count(), "load_avg_start": os.getloadavg(),
               "window": window, "alpha": alpha, "n_permutations": n_perm, "reference": n_ref}
    log("tiles ...")
    base = cached(cache / f"pool_{n_images}.npy", lambda: tiles_from_images(None, n_images, 1000))
    pool_all = np.concatenate([base, base.transpose(0, 2, 1)])
    rng = np.random.default_rng(42)
    perm = rng.permutation(len(pool_all))
    ref = pool_all[perm[:n_ref]]
    pool = pool_all[perm[n_ref:]]
    fp32_path, int8_path = build_encoders(cache, ref[:32])
    fx8 = FeatureExtractor(int8_path, backend="onnxruntime", threads=2)
    enc = CachedEncoder(fx8, path=cache / f"features_int8_{n_images}.npz")
    if parts & {"fa", "drift", "artefacts"}:
        log("reference + pool features (int8) ...")
        enc.warm(pool_all)

    if "fa" in parts:
        log("no drift ...")
        fa, mon = no_drift(enc, ref, pool, n_windows, window, alpha, n_perm)
        results["no_drift"] = fa
        results["sigma"] = mon.sigma
        log(fa)

    if "drift" in parts:
        styles, _ = domain_family(4, seed=3, root=DomainStyle())
        u0 = DomainStyle().to_vector()
        center = float(pool.mean())
        drift_res = []
        settings = [("contrast", c) for c in ((0.85,) if q else (0.95, 0.9, 0.85))]
        settings += [("defocus", r) for r in ((0.5,) if q else (0.15, 0.3, 0.5))]
        settings += [("style", lam) for lam in ((0.3,) if q else (0.1, 0.2, 0.3))]
        other = styles[int(np.argmax([np.linalg.norm(s.to_vector() - u0) for s in styles]))]
        results["style_target"] = other.name
        for kind, mag in settings:
            if kind == "style":
                st = DomainStyle.from_vector(u0 + mag * (other.to_vector() - u0), name=f"step{mag}")
                n_img = max(1, 3 * window // 16)
                tiles = cached(cache / f"style_{mag}_{n_img}.npy", lambda: tiles_from_images(st, n_img, 5000))
                enc.warm(tiles)

                def windows(r, tiles=tiles):
                    p = r.permutation(len(tiles))
                    return [tiles[p[i * window:(i + 1) * window]] for i in range(3)]
            elif kind == "defocus":
                def windows(r, mag=mag):
                    return [blur_u8(pool[r.choice(len(pool), window, replace=False)], mag * k) for k in (1, 2, 3)]
            else:
                def windows(r, mag=mag):
                    return [contrast_u8(pool[r.choice(len(pool), window, replace=False)], mag, center)
                            for _ in range(3)]
            delays, pres = [], 0
            for rep in range(1 if q else args.reps):
                d, pre, w = run_drift(enc, ref, pool, windows, window, alpha, n_perm, seed=100 + rep)
                delays.append(d)
                pres += pre
            row = {"kind": kind, "magnitude": mag, "delays": delays, "pre_onset_alarms": pres,
                   "detected_within_3": all(d is not None and d <= 3 for d in delays)}
            log(row)
            drift_res.append(row)
        results["drift"] = drift_res

    if "artefacts" in parts:
        log("artefacts ...")
        mon = QCMonitor(enc, ref, window=window, alpha=alpha, artefact_fpr=args.artefact_fpr)
        r = np.random.default_rng(7)
        clean_idx = r.choice(len(pool), 1024 if not q else 256, replace=False)
        clean = pool[clean_idx]
        fp = mon.update(clean).flags.mean()
        art = {"clean_fpr": float(fp), "artefact_fpr_target": mon.artefact_fpr, "kinds": {}}
        n_art = 64 if q else 256
        for kind in ("fold", "stain", "defocus", "brightness_jump"):
            made = [apply_artefact(t, kind, seed=1000 + i) for i, t in enumerate(clean[:n_art])]
            bad = np.stack([m[0] for m in made])
            frac = np.array([m[1].mean() for m in made])
            enc.warm(bad)
            rep = mon.update(bad)
            big = frac >= 0.01
            kinds = [k for k, f in zip(rep.kinds, rep.flags) if f]
            art["kinds"][kind] = {"recall": float(rep.flags.mean()), "recall_mask_ge_1pct": float(rep.flags[big].mean()),
                                  "n": len(bad), "n_mask_ge_1pct": int(big.sum()),
                                  "likely_cause": max(set(kinds), key=kinds.count) if kinds else ""}
            log(kind, art["kinds"][kind])
        results["artefacts"] = art

    if "throughput" in parts:
        log("throughput ...")
        from PIL import Image

        n_tp = 256 if q else 512
        batch = 64
        src = pool[:n_tp]
        pngs = []
        for t in src:
            buf = io.BytesIO()
            Image.fromarray(t).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        tp = {}
        # alternate int8 / fp32 so that both see the same machine load (the machine is shared)
        for name, path in (("int8", int8_path), ("fp32", fp32_path), ("int8 (again)", int8_path)):
            fx = FeatureExtractor(path, backend="onnxruntime", threads=2)
            mon = QCMonitor(fx, ref[:1024] if q else ref, window=window, alpha=alpha)
            # warm-up
            mon.update(np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in pngs[:batch]]))
            lat = []
            c0 = time.process_time()
            t0 = time.perf_counter()
            for s in range(0, n_tp, batch):
                t1 = time.perf_counter()
                tiles = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in pngs[s:s + batch]])
                mon.update(tiles)
                lat.append(time.perf_counter() - t1)
            dt = time.perf_counter() - t0
            cpu = time.process_time() - c0
            # the encoder alone on the same tiles, for the breakdown
            x = src[:256].astype(np.float32)[:, None] / 255
            t1 = time.perf_counter()
            fx.features(x, batch_size=32)
            enc_rate = 256 / (time.perf_counter() - t1)
            tp[name] = {"tiles_per_s": n_tp / dt, "latency_ms_per_update_of_64": 1e3 * float(np.median(lat)),
                        "latency_ms_max": 1e3 * float(np.max(lat)),
                        "encoder_only_tiles_per_s": enc_rate, "cpu_ms_per_tile": 1e3 * cpu / n_tp,
                        "load_avg": os.getloadavg()[0]}
            log(name, tp[name])
        results["throughput"] = tp
    results["load_avg_end"] = os.getloadavg()
    enc.save()
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def render(r) -> str:
    lines = [f"QC acceptance ({r['date']}, {r['machine']}, {r['cpus_visible']} cpus visible, load "
             f"{r['load_avg_start'][0]:.1f} -> {r['load_avg_end'][0]:.1f}); window {r['window']}, alpha {r['alpha']}, "
             f"{r['n_permutations']} permutations, reference {r['reference']} tiles", "",
             "| check | setting | result | target |", "|---|---|---|---|"]
    if "no_drift" in r:
        f = r["no_drift"]
        lines.append(f"| no drift: windows flagged | {f['windows']} windows | {f['alarms']} ({f['fraction']:.3f}) | "
                     f"<= {2 * r['alpha']:.3f} |")
        lines.append(f"| no drift: tile artefact flags | {f['windows'] * r['window']} clean tiles | "
                     f"{f['tile_fpr']:.4f} | <= 0.05 |")
    for d in r.get("drift", []):
        unit = {"contrast": "x contrast", "defocus": "px blur per window", "style": "of the way to "
                + r.get("style_target", "another style")}[d["kind"]]
        lines.append(f"| drift: {d['kind']} | {d['magnitude']} {unit} | delays {d['delays']} (pre-onset alarms "
                     f"{d['pre_onset_alarms']}) | <= 3 windows |")
    if "artefacts" in r:
        a = r["artefacts"]
        lines.append(f"| artefacts: clean FPR | held-out tiles, artefact_fpr={a['artefact_fpr_target']} | "
                     f"{a['clean_fpr']:.4f} | <= 0.05 |")
        for k, v in a["kinds"].items():
            lines.append(f"| artefacts: {k} recall | {v['n']} tiles (mask >= 1 %: {v['n_mask_ge_1pct']}) | "
                         f"{v['recall']:.3f} ({v['recall_mask_ge_1pct']:.3f}); cause '{v['likely_cause']}' | >= 0.9 |")
    for name, v in r.get("throughput", {}).items():
        lines.append(f"| throughput {name} | 256x256 uint8 PNG, end to end, batches of 64 | {v['tiles_per_s']:.1f} "
                     f"tiles/s, {v['latency_ms_per_update_of_64']:.0f} ms per update (max "
                     f"{v.get('latency_ms_max', float('nan')):.0f} ms, with a window test; encoder alone "
                     f"{v['encoder_only_tiles_per_s']:.1f} tiles/s; {v['cpu_ms_per_tile']:.1f} CPU-ms per tile; "
                     f"load {v['load_avg']:.1f}) | int8 >= 100 tiles/s |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
