"""QCMonitor: the window statistic, its permutation null and the witness against float64
brute force; false-alarm rate and detection; artefact recall on synthetic EM; state
round trip; thread safety; typed errors."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from scipy import stats

from neuroadda_rt import FormatError, InputValueError, QCMonitor, ShapeError
from neuroadda_rt.errors import DTypeError

# small references in unit tests: the monitor warns that they are too small for its alpha (tested on its own)
pytestmark = pytest.mark.filterwarnings("ignore::neuroadda_rt.qc.QCCalibrationWarning")
_PROJ = np.random.default_rng(7).normal(size=(66, 12)) / 4


def toy_encoder(tiles: np.ndarray) -> np.ndarray:
    """A fixed NumPy 'encoder': 8x8 block means and global mean/std through a random projection."""
    n, h, w = tiles.shape
    blocks = tiles[:, :h // 8 * 8, :w // 8 * 8].reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4)).reshape(n, 64)
    f = np.concatenate([blocks - 0.5, tiles.mean(axis=(1, 2))[:, None] - 0.5, tiles.std(axis=(1, 2))[:, None]], 1)
    return np.tanh(f @ _PROJ).astype(np.float32)


def noise_tiles(rng, n, size=32, mean=0.5, sd=0.15):
    return np.clip(rng.normal(mean, sd, size=(n, size, size)), 0, 1).astype(np.float32)


def kernel(a, b, sigmas):
    """The Gaussian kernel in float64 (the monitor uses the package's float32 C++ kernel)."""
    d2 = ((a[:, None, :].astype(np.float64) - b[None, :, :].astype(np.float64)) ** 2).sum(-1)
    return np.mean([np.exp(-d2 / (2 * s * s)) for s in sigmas], axis=0)


def mmd2_u(x, y, sigmas):
    kxx, kyy, kxy = kernel(x, x, sigmas), kernel(y, y, sigmas), kernel(x, y, sigmas)
    n, m = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def test_window_statistic_calibration_and_witness_match_brute_force(rng):
    """The window MMD², every calibration window (leave its sections and one on each side out) and the
    witness, against float64 brute force; the threshold is Cantelli's mean + sqrt(1/alpha - 1) sd."""
    ref = rng.normal(size=(120, 6)).astype(np.float32)
    groups = np.repeat(np.arange(12), 10)  # 12 sections of 10 tiles
    proj = rng.normal(size=(3, 6))

    def enc(t):
        return (np.stack([t.mean((1, 2)), t.std((1, 2)), t[:, 0, 0]], 1) @ proj).astype(np.float32)

    n = 11
    mon = QCMonitor(enc, ref, window=n, sigma=[0.8, 2.0], reference_groups=groups, alpha=0.05, statistic="both",
                    n_neighbors=3)
    sig = [0.8, 2.0]
    cal, cal_nov = [], []
    for s in range(0, 120 - n + 1, n // 2):
        blk = np.arange(s, s + n)
        lo, hi = groups[blk].min() - 1, groups[blk].max() + 1
        rest = (groups < lo) | (groups > hi)
        if rest.sum() >= n:
            cal.append(mmd2_u(ref[blk], ref[rest], sig))
            dist = np.sqrt(((ref[blk, None, :].astype(np.float64) - ref[None, rest]) ** 2).sum(-1))
            cal_nov.append(np.log(np.sort(dist, axis=1)[:, 2]).mean())
    np.testing.assert_allclose(mon._cal, cal, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mon._cal_nov, cal_nov, rtol=1e-6, atol=1e-6)
    k = math.sqrt(1 / 0.025 - 1)  # "both": each statistic at alpha / 2
    assert mon.threshold == pytest.approx(np.mean(cal) + k * np.std(cal, ddof=1), rel=1e-4)
    assert mon.novelty_threshold == pytest.approx(np.mean(cal_nov) + k * np.std(cal_nov, ddof=1), rel=1e-6)
    tiles = rng.random((n + 4, 8, 8)).astype(np.float32)
    r1 = mon.update(tiles[:7])
    r2 = mon.update(tiles[7:])
    assert r1.windows == () and len(r2.windows) == 1
    w = r2.windows[0]
    feats = enc(tiles)
    assert w.mmd2 == pytest.approx(mmd2_u(feats[:n], ref, sig), rel=1e-5, abs=1e-6)
    dist = np.sqrt(((feats[:n, None, :].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1))
    assert w.novelty == pytest.approx(np.log(np.sort(dist, axis=1)[:, 2]).mean(), rel=1e-6)
    zs = [(w.mmd2 - np.mean(cal)) / np.std(cal, ddof=1), (w.novelty - np.mean(cal_nov)) / np.std(cal_nov, ddof=1)]
    p = min(1.0, 2 * min(1.0 if z <= 0 else 1 / (1 + z * z) for z in zs))
    assert w.p_value == pytest.approx(p, rel=1e-3)
    assert w.drift == (w.mmd2 >= mon.threshold or w.novelty >= mon.novelty_threshold)
    assert w.threshold == mon.threshold
    # witness of the last update: window = the last n tiles, own kernel value excluded
    win = feats[-n:]
    kw = kernel(feats[7:], win, sig)
    own = np.arange(7, n + 4) >= n + 4 - n
    expect = (kw.sum(1) - own) / np.where(own, n - 1, n) - kernel(feats[7:], ref, sig).mean(1)
    np.testing.assert_allclose(r2.scores, expect, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r2.similarity, kernel(feats[7:], ref, sig).mean(1), rtol=0, atol=1e-6)


def correlated_sections(rng, n_sections, per_section, size=32, walk=0.15):
    """Tiles whose section brightness follows a random walk along z (consecutive sections alike, far
    ones less so), shared by the section's tiles."""
    out, level = [], 0.0
    for _ in range(n_sections):
        level += rng.normal(0, walk)
        out.append(noise_tiles(rng, per_section, size=size, mean=0.5 + 0.04 * np.tanh(level), sd=0.15))
    return np.concatenate(out)


def test_calibrated_drift_holds_on_correlated_sections_where_iid_null_fails(rng):
    """A stream of sections whose brightness wanders slowly (consecutive sections alike): the
    calibrated threshold keeps the per-window false-alarm rate within 2 alpha, while the same windows
    tested with the exchangeable (iid permutation) null reject far more often. A brightness step far
    beyond the wander is still caught in its first window."""
    per, window = 16, 32
    tiles = correlated_sections(rng, 100, per)
    ref, stream = tiles[:30 * per], tiles[30 * per:]
    groups = np.repeat(np.arange(30), per)
    mon = QCMonitor(toy_encoder, ref, window=window, alpha=0.05, reference_groups=groups)
    ws = mon.update(stream).windows
    alarms = sum(w.drift for w in ws)
    assert len(ws) == len(stream) // window == 35
    assert alarms <= 2 * 0.05 * len(ws)
    from neuroadda_rt import mmd2_test

    feats_ref, feats = toy_encoder(ref), toy_encoder(stream)
    iid = sum(mmd2_test(feats[i * window:(i + 1) * window], feats_ref, sigma=mon.sigma,
                        seed=i).p_value <= 0.05 for i in range(len(ws)))
    assert iid > alarms + 5
    assert mon.update(noise_tiles(rng, window, mean=0.85)).windows[0].drift


def test_window_statistic_matches_package_kernel(rng):
    mmd = pytest.importorskip("neuroadda_rt.mmd")
    ref = rng.normal(size=(200, 8)).astype(np.float32)
    mon = QCMonitor(lambda t: t.reshape(len(t), -1)[:, :8].astype(np.float32) * 4, ref, window=32)
    rep = mon.update(rng.random((32, 8, 8)).astype(np.float32))
    x = mon._ring_f.copy()  # the window's features (no wrap-around yet)
    assert rep.mmd2 == pytest.approx(float(mmd.mmd2(x, ref, sigma=mon.sigma)), rel=1e-4, abs=1e-6)


def test_median_heuristic_bandwidth(rng):
    ref = rng.normal(size=(300, 5)).astype(np.float32)
    mon = QCMonitor(toy_encoder, ref, window=16)
    d2 = ((ref[:, None].astype(np.float64) - ref[None]) ** 2).sum(-1)[np.triu_indices(300, 1)]
    # the median over a half/half split of the same sample is close to the full one
    assert mon.sigma == pytest.approx(math.sqrt(np.median(d2) / 2), rel=0.1)


def test_false_alarm_rate_without_drift(rng):
    """Exchangeable noise tiles, alpha = 0.05, 150 windows: Cantelli's bound makes the rate at most
    alpha for windows like the calibration ones; <= 2 alpha is asserted (deterministic for the seed)."""
    alpha, n_win, window = 0.05, 150, 32
    mon = QCMonitor(toy_encoder, noise_tiles(rng, 512), window=window, alpha=alpha, seed=1)
    for _ in range(n_win):
        mon.update(noise_tiles(rng, window))
    ws = mon.windows
    assert len(ws) == n_win
    assert sum(w.drift for w in ws) <= 2 * alpha * n_win
    assert all(0 < w.p_value <= 1 for w in ws)


def test_detects_strong_drift_within_one_window(rng):
    mon = QCMonitor(toy_encoder, noise_tiles(rng, 512), window=32, alpha=0.01)
    for _ in range(3):
        assert not mon.update(noise_tiles(rng, 32)).drift
    rep = mon.update(noise_tiles(rng, 32, mean=0.6))  # a brightness step
    assert rep.drift and rep.windows[0].rule == "novelty"
    assert rep.p_value <= 0.01
    # the witness points at the drifted tiles: positive scores once the window holds them
    assert np.mean(rep.scores) > 0


def test_too_small_reference_says_why(rng):
    """A reference too short for the drift calibration warns with the numbers, and its windows say
    'uncalibrated' instead of silently never alarming; an all-black tile is still flagged although
    1/(m+1) > artefact_fpr (the robust cut does not need m >= 1/alpha)."""
    from neuroadda_rt.qc import QCCalibrationWarning

    with pytest.warns(QCCalibrationWarning) as rec:
        mon = QCMonitor(toy_encoder, noise_tiles(rng, 50), window=32, alpha=0.01)
    msgs = [str(w.message) for w in rec]
    assert any("drift is not tested" in m for m in msgs) and any("1/51" in m for m in msgs)
    rep = mon.update(np.concatenate([noise_tiles(rng, 31), np.zeros((1, 32, 32), np.float32)]))
    assert rep.windows[0].rule == "uncalibrated" and not rep.windows[0].drift
    assert rep.flags[-1] and rep.kinds[-1] == "black_region"
    assert "drift is not tested" in mon.summary()["drift_note"]


def test_short_reference_calibrates_on_shorter_runs(rng, tmp_path):
    """13 sections of 3 tiles (gala's reference) give no run of 32 tiles with a section on each side left
    out: the threshold comes from the longest shorter run giving >= 8 (found here by brute force), the
    values match float64 brute force, full windows are tested against it, it warns, and it survives save/load."""
    from neuroadda_rt.qc import QCCalibrationWarning

    def enc(t):
        return np.stack([t.mean((1, 2)), t.std((1, 2))], 1).astype(np.float32)

    groups = np.repeat(np.arange(13), 3)
    ref = noise_tiles(rng, 39, size=16)
    with pytest.warns(QCCalibrationWarning) as rec:
        mon = QCMonitor(enc, ref, window=32, reference_groups=groups, alpha=0.01, sigma=1.0, n_neighbors=3)
    feats = enc(ref).astype(np.float64)

    def runs(n):
        out = []
        for s in range(0, 39 - n + 1, n // 2):
            blk = np.arange(s, s + n)
            rest = (groups < groups[blk].min() - 1) | (groups > groups[blk].max() + 1)
            if rest.sum() >= n:
                out.append((blk, rest))
        return out

    assert len(runs(32)) == 0
    length = next(n for n in range(31, 3, -1) if len(runs(n)) >= 8)
    assert mon.calibration_length == length and mon.drift_note == ""
    assert any(f"runs of {length} consecutive tiles" in str(w.message) for w in rec)
    cal_nov = []
    for blk, rest in runs(length):
        dist = np.sqrt(((feats[blk, None, :] - feats[None, rest]) ** 2).sum(-1))
        cal_nov.append(np.log(np.sort(dist, axis=1)[:, 2]).mean())
    np.testing.assert_allclose(mon._cal_nov, cal_nov, rtol=1e-5, atol=1e-5)
    k = math.sqrt(1 / 0.01 - 1)
    assert mon.novelty_threshold == pytest.approx(np.mean(cal_nov) + k * np.std(cal_nov, ddof=1), rel=1e-5)
    assert mon.calibration["calibration_length"] == length and mon.summary()["calibration_note"]
    rep = mon.update(noise_tiles(rng, 32, size=16, mean=0.5))
    assert len(rep.windows) == 1 and rep.windows[0].rule != "uncalibrated"
    assert 0 <= rep.windows[0].p_value <= 1
    drifted = mon.update(noise_tiles(rng, 32, size=16, mean=0.9, sd=0.02))  # brighter, flatter: far away
    assert drifted.drift and drifted.windows[0].rule == "novelty"
    path = mon.save(tmp_path / "state.safetensors")
    back = QCMonitor.load(path, enc)
    assert back.calibration_length == length and back.novelty_threshold == mon.novelty_threshold
    assert back.calibration_note == mon.calibration_note


def _synthetic_tiles(n_images, seed0, size=64, image=256):
    from neuroadda_rt.study.synthetic import make_domain

    out = []
    for i in range(n_images):
        img, _ = make_domain(None, (image, image), seed=seed0 + i)
        k = image // size
        out.append(img.reshape(k, size, k, size).transpose(0, 2, 1, 3).reshape(k * k, size, size))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def em_tiles():
    return _synthetic_tiles(16, 100)  # 256 tiles of 64x64


def test_artefact_flags_recall_and_fpr(em_tiles):
    """Recall >= 0.9 for stains, defocus and brightness jumps, and a clean-tile false-positive
    rate within the binomial 99.9 % bound of the target (artefact_fpr = 0.05 on 64 clean
    tiles). Folds and brightness jumps are asserted at a lower recall here: on a 64-pixel tile
    a fold is a dark line no longer than a membrane segment, and the tile means of 64-pixel
    tiles already spread over +-30 % (brightness gradient, cell contrast), so a x0.75 gain can
    stay inside the reference range; the cut's exponential-tail term (which extends the 192-tile
    reference's tail to artefact_fpr / D instead of stopping at its maximum) took this recall from
    >= 0.75 to 0.72. Recall at 256x256 (>= 0.9 for every kind) is measured by
    benchmarks/qc_acceptance.py."""
    from neuroadda_rt.study.synthetic import apply_artefact

    ref, clean = em_tiles[:192], em_tiles[192:]
    mon = QCMonitor(toy_encoder, ref, window=32, artefact_fpr=0.05)
    assert set(mon.detectors) >= {"similarity", "mean", "sharpness", "line_ridge", "flat", "block_max"}
    rep = mon.update(clean)
    assert rep.flags.sum() <= stats.binom.ppf(0.999, len(clean), 0.05)
    for kind, expect in [("fold", None), ("stain", "stain"), ("defocus", "defocus"),
                         ("brightness_jump", "brightness")]:
        bad = np.stack([apply_artefact(t, kind, seed=i)[0] for i, t in enumerate(clean[:32])])
        r = mon.update(bad)
        floor = {"fold": 0.4, "brightness_jump": 0.7}.get(kind, 0.9)
        assert r.flags.mean() >= floor, (kind, r.flags.mean())
        if expect is not None:
            kinds = [k for k, f in zip(r.kinds, r.flags) if f]
            assert kinds.count(expect) >= 0.5 * len(kinds), (kind, kinds)


def test_artefact_flags_match_robust_cuts(rng):
    """Flags and severities against a NumPy reimplementation of the rule: robust z = (v - median) /
    max(1.4826 MAD, floor) in the detector's tail, cut = max(Phi^-1(1 - fpr / D), largest reference z,
    exponential tail of the top 10 % (>= 10) reference z's extrapolated to fpr / D); on exchangeable
    clean tiles the flag rate stays near artefact_fpr."""
    from statistics import NormalDist

    from neuroadda_rt.qc.descriptors import IMAGE_STATS, IMAGE_TAILS, SCALE_FLOOR, image_stats

    ref = noise_tiles(rng, 400)
    mon = QCMonitor(toy_encoder, ref, window=64, artefact_fpr=0.02)
    new = noise_tiles(rng, 600)
    rep = mon.update(new)
    rs, ns = image_stats(ref), image_stats(new)
    d = len(mon.detectors)
    gauss = NormalDist().inv_cdf(1 - 0.02 / d)
    rel = []
    for j, name in enumerate(IMAGE_STATS):
        r, v = rs[:, j], ns[:, j]
        med = np.median(r)
        sc = max(1.4826 * np.median(np.abs(r - med)), SCALE_FLOOR[name])
        t = IMAGE_TAILS[name]
        def zf(x, med=med, sc=sc, t=t):
            return (x - med) / sc if t > 0 else (med - x) / sc if t < 0 else np.abs(x - med) / sc
        zr = np.sort(zf(r))
        k = max(10, round(0.1 * len(zr)))
        u = zr[-k - 1]
        tail = u + np.mean(zr[-k:] - u) * np.log(k / len(zr) / (0.02 / d))
        rel.append(zf(v) / max(gauss, zr[-1], tail))
    rel = np.max(rel, axis=0)
    desc = mon.detectors.index("mean")
    np.testing.assert_array_less(rel - 1e-9, rep.severity + 1e-9)  # similarity can only add
    assert np.all(rep.flags == (rep.severity > 1)) and desc == 1
    assert np.mean(rep.flags) <= stats.binom.ppf(0.999, 600, 0.02) / 600
    assert np.all((rep.artefact_p <= 0.02) == rep.flags)


def test_save_restore_continues_exactly(rng, tmp_path):
    ref = noise_tiles(rng, 256)
    stream = [noise_tiles(rng, k) for k in (20, 13, 40, 7, 33)]
    a = QCMonitor(toy_encoder, ref, window=24, seed=5)
    b = QCMonitor(toy_encoder, ref, window=24, seed=5)
    for t in stream[:2]:
        a.update(t, timestamp=1.0)
        b.update(t, timestamp=1.0)
    path = b.save(tmp_path / "state.safetensors", extra={"seq": 2})
    assert not list(tmp_path.glob("*.tmp"))
    c = QCMonitor.load(path, toy_encoder)
    assert c.loaded_extra == {"seq": 2}
    for t in stream[2:]:
        ra, rc = a.update(t, timestamp=2.0), c.update(t, timestamp=2.0)
        np.testing.assert_array_equal(ra.scores, rc.scores)
        np.testing.assert_array_equal(ra.flags, rc.flags)
        assert repr(ra.windows) == repr(rc.windows)  # NaN thresholds of the unused statistic: compare the text
        assert ra.ids == rc.ids
    assert a.summary() == c.summary()
    assert repr(a.windows) == repr(c.windows)


def test_load_refuses_garbage(tmp_path, rng):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FormatError):
        QCMonitor.load(bad, toy_encoder)
    mon = QCMonitor(toy_encoder, noise_tiles(rng, 64), window=8)
    good = mon.save(tmp_path / "s.safetensors")
    good.write_bytes(good.read_bytes()[:-100])  # truncated
    with pytest.raises(FormatError):
        QCMonitor.load(good, toy_encoder)
    with pytest.raises(FileNotFoundError):
        QCMonitor.load(tmp_path / "missing.safetensors", toy_encoder)


def test_bounded_memory_over_long_stream(rng):
    mon = QCMonitor(toy_encoder, noise_tiles(rng, 64), window=8, history=5)
    shapes = (mon._ring_f.shape, mon._ring_s.shape)
    for _ in range(40):
        mon.update(noise_tiles(rng, 8))
    assert len(mon.windows) == 5 and mon.n_windows == 40 and mon.n_tiles == 320
    assert (mon._ring_f.shape, mon._ring_s.shape) == shapes
    assert [w.index for w in mon.windows] == list(range(35, 40))


def test_update_from_several_threads(rng):
    ref = noise_tiles(rng, 128)
    mon = QCMonitor(toy_encoder, ref, window=16)
    batches = [noise_tiles(rng, 6) for _ in range(24)]
    reports, errors = [], []

    def work(chunk):
        try:
            for b in chunk:
                reports.append(mon.update(b))
        except Exception as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert mon.n_tiles == 144 and mon.n_windows == 144 // 16
    assert sorted(w.index for r in reports for w in r.windows) == list(range(9))
    ids = sorted(int(i) for r in reports for i in r.ids)
    assert ids == list(range(144))  # every tile numbered exactly once
    # scores do not depend on the thread: similarity is a function of the tile alone
    single = QCMonitor(toy_encoder, ref, window=16)
    for b in batches[:3]:
        r_single = single.update(b)
        match = [r for r in reports if np.array_equal(r.similarity, r_single.similarity)]
        assert match


def test_feature_extractor_model(rng):
    torch = pytest.importorskip("torch")
    from neuroadda_rt import FeatureExtractor
    from neuroadda_rt.models import UNet

    torch.manual_seed(0)
    fx = FeatureExtractor(UNet(widths=(4, 8)), backend="torch", device="cpu")
    tiles = (rng.random((40, 32, 32)) * 255).astype(np.uint8)
    mon = QCMonitor(fx, tiles[:32], window=8)
    rep = mon.update(tiles[32:])
    assert mon.dim == 8 and len(rep.windows) == 1
    np.testing.assert_allclose(rep.similarity, mon.update(tiles[32:]).similarity)


def test_reference_as_features_and_errors(rng):
    feats = rng.normal(size=(100, 12)).astype(np.float32)
    mon = QCMonitor(toy_encoder, feats, window=8)
    assert mon.detectors == ["similarity"]  # no image descriptors without reference tiles
    rep = mon.update(noise_tiles(rng, 3), ids=["a", "b", "c"], timestamp=12.5)
    assert rep.ids == ["a", "b", "c"] and rep.timestamp == 12.5 and rep.windows == () and rep.mmd2 is None
    assert rep.to_dict()["ids"] == ["a", "b", "c"]
    with pytest.raises(ShapeError):
        mon.update(noise_tiles(rng, 3), ids=["a"])
    with pytest.raises(DTypeError):
        mon.update(np.zeros((2, 16, 16), dtype=np.int64))
    with pytest.raises(InputValueError):
        mon.update(np.full((2, 16, 16), np.nan, dtype=np.float32))
    with pytest.raises(InputValueError):
        mon.update(np.full((2, 16, 16), 2.0, dtype=np.float32))
    with pytest.raises(ShapeError):
        mon.update(np.zeros((2, 2, 16, 16), dtype=np.uint8))
    with pytest.raises(ShapeError):
        QCMonitor(toy_encoder, feats[:, :5], window=8).update(noise_tiles(rng, 2))  # 5-d reference, 12-d model
    with pytest.raises(ShapeError):
        QCMonitor(toy_encoder, feats[:10], window=8)
    with pytest.raises(InputValueError):
        QCMonitor(toy_encoder, feats, alpha=1.5)
    with pytest.raises(InputValueError):
        QCMonitor(toy_encoder, feats, window=2)
    with pytest.raises(InputValueError):
        QCMonitor(toy_encoder, np.full((20, 3), np.inf, np.float32))
    with pytest.raises(DTypeError):
        QCMonitor(42, feats)
    tiled = QCMonitor(toy_encoder, noise_tiles(rng, 64), window=8)
    with pytest.raises(ShapeError, match="reference"):
        tiled.update(noise_tiles(rng, 2, size=48))  # descriptors are calibrated at 32x32
    with pytest.raises(ShapeError):
        tiled.update(np.zeros((2, 4, 4), np.uint8))


def test_model_package_model(rng):
    """A loaded ModelPackage is accepted like its path: the same features, hence the same statistics."""
    pytest.importorskip("onnxruntime")
    from pathlib import Path

    from neuroadda_rt import FeatureExtractor, load_model

    tiny = Path(__file__).resolve().parent / "assets" / "tiny_model"
    if not tiny.is_dir():
        pytest.skip("tests/assets/tiny_model is missing (tools/make_test_assets.py writes it)")
    pkg = load_model(tiny)
    tiles = (rng.random((40, 32, 32)) * 255).astype(np.uint8)
    by_pkg = QCMonitor(pkg, tiles[:32], window=8, backend="onnxruntime")
    by_path = QCMonitor(tiny, tiles[:32], window=8, backend="onnxruntime")
    ref_feats = FeatureExtractor(tiny, backend="onnxruntime").features(tiles[:32, None] / 255.0)
    assert by_pkg.dim == ref_feats.shape[1]
    np.testing.assert_allclose(by_pkg.ref, by_path.ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(by_pkg.update(tiles[32:]).similarity, by_path.update(tiles[32:]).similarity,
                               rtol=1e-6, atol=1e-6)
    assert by_pkg._model.fingerprint == by_path._model.fingerprint != ""


def test_black_stripes_saturation_and_blur_are_named(em_tiles):
    """The injected kinds the real-data acceptance uses, on synthetic EM: a black padding stripe a few
    pixels wide at the edge, a saturated half-plane and a Gaussian blur are flagged and named; a black
    column 3 pixels wide is enough (black_lines), although it darkens under 5% of the tile."""
    from scipy import ndimage

    ref, clean = em_tiles[:192], em_tiles[192:224]
    mon = QCMonitor(toy_encoder, ref, window=32, artefact_fpr=0.05)
    stripe = clean.copy()
    stripe[:, :, :3] = 0
    sat = clean.astype(np.float32)
    sat[:, :, 32:] = np.minimum(255, 1.8 * sat[:, :, 32:] + 77)
    blur = np.stack([ndimage.gaussian_filter(t.astype(np.float32), 3.0) for t in clean])
    for tiles, cause in ((stripe, "black_region"), (sat.astype(np.uint8), "saturation"),
                         (np.clip(np.rint(blur), 0, 255).astype(np.uint8), "defocus")):
        rep = mon.update(tiles)
        assert rep.flags.mean() >= 0.9, (cause, rep.flags.mean())
        named = [k for k, f in zip(rep.kinds, rep.flags) if f]
        assert named.count(cause) >= 0.9 * len(named), (cause, named)


def test_flat_area_matches_brute_force(rng):
    """flat_area against a loop over 4x4 blocks in float64: blocks without a black (<= 5/255) or
    saturated (>= 250/255) pixel whose std is below 0.3 x the median std of those blocks; a smooth
    film over a quarter of a noisy tile counts as a quarter, a clipped black band not at all."""
    from neuroadda_rt.qc.descriptors import BLACK, FLAT_RATIO, IMAGE_STATS, SATURATED, image_stats

    tiles = rng.uniform(0.2, 0.8, size=(4, 32, 32)).astype(np.float32)
    tiles[1, :16, :16] = 0.5 + rng.normal(0, 0.002, size=(16, 16))  # a smooth film: 16 of 64 blocks
    tiles[2, :, :8] = 0.0  # a black band: clipped, not flat area
    tiles[3] = 0.0  # all clipped
    got = image_stats(tiles)[:, IMAGE_STATS.index("flat_area")]

    def brute(t):
        stds, open_ = [], []
        for by in range(0, 32, 4):
            for bx in range(0, 32, 4):
                b = t[by:by + 4, bx:bx + 4].astype(np.float64)
                stds.append(b.std())
                open_.append(not ((b <= np.float32(BLACK)) | (b >= np.float32(SATURATED))).any())
        stds, open_ = np.array(stds), np.array(open_)
        if not open_.any():
            return 0.0
        return float(np.mean((stds < FLAT_RATIO * np.median(stds[open_])) & open_))

    want = [brute(t) for t in tiles]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert want[1] == pytest.approx(0.25) and want[2] == 0.0 and want[3] == 0.0


def test_tail_cut_extrapolates_exponential_quantile():
    """The artefact cut's tail term on a reference of M exponential z-scores: the value exceeded with
    probability p (analytic -log p) is recovered beyond the reference's maximum, where the maximum itself
    is exceeded with probability 1/(M+1) whatever p is."""
    from neuroadda_rt.qc.monitor import _tail_cut

    z = np.random.default_rng(3).exponential(1.0, size=4000)
    for p in (1e-3, 2e-4):
        assert _tail_cut(z, p) == pytest.approx(-np.log(p), abs=0.6)
    assert _tail_cut(z, 2e-4) > z.max()
    assert _tail_cut(z[:50], 0.5) == -np.inf  # p not beyond the fitted share: the other cuts apply


def test_flat_area_names_a_film_stain_and_ignores_a_global_gain(rng):
    """A smooth film over a third of a tile (its texture elsewhere intact) is flagged through flat_area and
    named stain; a tile dimmed as a whole (gain 0.3) lowers every block's std, which the absolute smoothest
    block sees but the ratio flat_area does not (its value is the gain-free one), and it is named brightness.
    (That ``flat`` does not name a stain when the brightness moves is exercised by
    test_artefact_flags_recall_and_fpr: 11 of 23 brightness jumps were named brightness without the rule.)"""
    from neuroadda_rt.qc.descriptors import IMAGE_STATS, image_stats

    ref = noise_tiles(rng, 400, sd=0.1)
    # the descriptors' own behaviour: the learned detectors (tested in test_qc_artefact_net) left out
    mon = QCMonitor(toy_encoder, ref, window=32, artefact_fpr=0.01, artefact_net=False)
    base = noise_tiles(rng, 1, sd=0.1)
    dim = base * np.float32(0.3)
    film = base.copy()
    film[0, :, :11] = 0.5 + rng.normal(0, 0.002, size=(32, 11))
    tiles = np.concatenate([dim, film])
    rep = mon.update(tiles)
    st = image_stats(np.concatenate([base, tiles]))
    fa = IMAGE_STATS.index("flat_area")
    assert st[1, fa] == st[0, fa] and st[2, fa] >= 0.25  # gain-invariant; the film's 2 of 8 block columns counted
    rel = mon._zscores({"similarity": rep.similarity, **dict(zip(IMAGE_STATS, st[1:].T))}) / mon._cut[:, None]
    r = dict(zip(mon.detectors, rel[:, 1]))
    assert r["flat_area"] > 1 and max(r, key=r.get) == "flat_area"
    assert rep.flags.all() and rep.kinds == ["brightness", "stain"]
