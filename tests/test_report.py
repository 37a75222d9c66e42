"""The HTML report: self-contained (no external resources), every plot embedded, and rendered by a real
headless browser (Debian's ``chromium``; skipped with a reason when it is not installed)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from neuroadda_rt.report import write_report  # noqa: E402

CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(c)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)")


def make_run_dir(tmp_path: Path, *, complete: bool = True) -> Path:
    """A run directory as run_workflow writes it, filled with known values."""
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    run.mkdir()
    ranking = {"ranking": [{"rank": i + 1, "name": f"syn0{i}", "path": None, "mmd2": v, "p_value": p, "sigma": 1.0,
                            "n_reference": 64, "n_target": 32, "sha256": "x", "cached": False}
                           for i, (v, p) in enumerate([(0.01, 0.4), (0.2, 0.005), (0.5, 0.005)])],
               "settings": {"n_tiles": 32, "tile_size": 64, "seed": 0, "n_permutations": 200,
                            "target": {"shape": [4, 256, 256], "path": "target.tif"}}}
    (run / "ranking.json").write_text(json.dumps(ranking))
    pool = rng.uniform(0.2, 0.6, size=200)
    chosen = np.argsort(np.abs(pool - np.median(pool)))[:4]
    sel = {"coords": [[0, 10 * i, 20 * i] for i in range(4)], "scores": pool[chosen].tolist(),
           "pool_scores": pool.tolist(), "pool_coords": [[0, 0, 0]] * 200, "indices": chosen.tolist(),
           "tile_size": 64, "strategy": "median", "measure": "entropy", "settings": {"pool": 200}}
    (run / "selection.json").write_text(json.dumps(sel))
    np.savez(run / "gallery.npz", chosen=rng.integers(0, 255, (4, 64, 64), dtype=np.uint8),
             uncertain=rng.integers(0, 255, (8, 64, 64), dtype=np.uint8), uncertain_scores=np.sort(pool)[::-1][:8],
             uncertain_coords=np.zeros((8, 3), np.int64))
    doc = {"format": "neuroadda_rt.run/1", "status": "complete" if complete else "awaiting_labels",
           "settings": {"n": 4, "strategy": "median", "seed": 0, "train": {"steps": 50}},
           "annotation_dir": "annotation", "timings_s": {"rank": 1.0}}
    if complete:
        doc["training"] = {"finetuned": {"loss": list(np.exp(-np.linspace(0, 3, 50)) + 0.1)},
                           "scratch": {"loss": list(np.exp(-np.linspace(0, 1, 50)) + 0.3)}}
        doc["evaluation"] = {k: {"overall": {"vi_split": a, "vi_merge": b, "vi_total": a + b,
                                             "adapted_rand_error": c}, "threshold": 0.5}
                             for k, (a, b, c) in {"finetuned": (0.3, 0.2, 0.1), "scratch": (0.8, 0.6, 0.3),
                                                  "source": (0.5, 0.4, 0.2)}.items()}
        doc["vi_reduction"] = 1 - 0.5 / 1.4
        doc["test"] = {"n": 8}
    (run / "run.json").write_text(json.dumps(doc))
    return run


def _imgs(text: str) -> list[str]:
    return re.findall(r'<img id="([^"]+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)


def test_report_is_self_contained(tmp_path):
    run = make_run_dir(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    text = out.read_text()
    ids = [i for i, _ in _imgs(text)]
    assert ids == ["fig-ranking", "fig-uncertainty", "fig-chosen", "fig-uncertain", "fig-training", "fig-vi"]
    # no external resource of any kind
    assert not re.search(r'(src|href)="(?!data:)', text)
    from PIL import Image

    for _, b64 in _imgs(text):
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    # the numbers and settings are in the page
    assert "syn00" in text and "64.3%" in text and "n_permutations" in text and "median" in text


def test_report_says_cuda_compiled_and_available_separately(tmp_path):
    """``cuda=True`` on a machine without a GPU meant "compiled": the page says both, from the compiled core."""
    from neuroadda_rt import _core

    compiled = bool(_core.built_with_cuda())
    available = compiled and _core.cuda_device_count() > 0
    text = write_report(make_run_dir(tmp_path)).read_text()
    assert f"cuda_compiled={compiled}" in text
    assert f"cuda_available={available}" in text
    assert not re.search(r"\bcuda=", text)


def test_report_of_a_run_awaiting_labels(tmp_path):
    run = make_run_dir(tmp_path, complete=False)
    text = write_report(run, tmp_path / "r.html").read_text()
    assert [i for i, _ in _imgs(text)] == ["fig-ranking", "fig-uncertainty", "fig-chosen", "fig-uncertain"]
    assert "waiting for labels" in text


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="ranking.json"):
        write_report(tmp_path / "empty")


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path):
    run = make_run_dir(tmp_path)
    page = write_report(run)
    # a copy with a probe script that records every image's decoded size in the DOM
    probe = page.read_text().replace(
        "</body>", "<script>window.addEventListener('load',()=>{const d=document.createElement('pre');"
                   "d.id='probe';d.textContent=JSON.stringify([...document.images].map(i=>[i.id,i.complete,"
                   "i.naturalWidth,i.naturalHeight]));document.body.appendChild(d);});</script></body>")
    probed = tmp_path / "probe.html"
    probed.write_text(probe)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True,
                         timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert m, f"chromium did not run the page: {dom.stderr[-2000:]}"
    images = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(images) == 6
    for ident, complete, w, h in images:
        assert complete and w > 100 and h > 100, (ident, w, h)
    # the screenshot shows the plots: many non-white pixels, and the orange of the best source's bar
    shot = tmp_path / "shot.png"
    r = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1100,2400", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.exists(), r.stderr[-2000:]
    from PIL import Image

    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert (px.sum(axis=2) < 700).mean() > 0.05
    orange = (abs(px[..., 0] - 0xD9) < 12) & (abs(px[..., 1] - 0x5F) < 12) & (abs(px[..., 2] - 0x02) < 12)
    assert orange.sum() > 200


def test_headline_shows_the_source_as_is_beside_fine_tuned(tmp_path):
    # Issue 19/15: the demo's headline "96.5% vs scratch" hid that the source as-is scored better than the
    # fine-tuned model. The headline now has the source-as-is row and says when it won.
    from neuroadda_rt.report import headline_lines

    run = make_run_dir(tmp_path)
    doc = json.loads((run / "run.json").read_text())
    lines = headline_lines(doc)
    assert lines[0] == f"fine-tuned (n = 4): VI 0.500, {100 * (1 - 0.5 / 1.4):.1f}% lower than scratch, " \
                       f"{100 * (1 - 0.5 / 0.9):.1f}% lower than the source as-is"
    assert lines[1:] == ["scratch (n = 4): VI 1.400", "source as-is (n = 0): VI 0.900"]
    doc["evaluation"]["source"]["overall"]["vi_total"] = 0.25
    lines = headline_lines(doc)
    assert "100.0% higher than the source as-is" in lines[0]
    assert lines[-1].startswith("the source as-is scored better than the fine-tuned model")
    (run / "run.json").write_text(json.dumps(doc))
    text = write_report(run).read_text()
    assert "source as-is (n = 0): VI 0.250" in text and "the source as-is scored better" in text
    assert headline_lines({"status": "awaiting_labels"}) == []
