"""Training: determinism, resumption, learning, augmentation alignment, checkpoint safety."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from neuroadda_rt.errors import FormatError, InputValueError, ShapeError  # noqa: E402
from neuroadda_rt.models import UNet  # noqa: E402
from neuroadda_rt.training import (  # noqa: E402
    CHECKPOINT_NAME,
    TrainRecipe,
    _apply_geometry,
    _mirror_index,
    _sample_geometry,
    augment_pair,
    train_network,
)


def _boundary_targets(lab, representation):
    """Brute-force 4-neighbour boundary map (independent of neuroadda_rt.labels)."""
    b = np.zeros(lab.shape, bool)
    h, w = lab.shape
    for i in range(h):
        for j in range(w):
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                a, c = i + di, j + dj
                if 0 <= a < h and 0 <= c < w and lab[a, c] != lab[i, j]:
                    b[i, j] = True
    t = b.astype(np.float32)[None]
    return t, np.ones_like(t)


def _fast_boundary_targets(lab, representation):
    b = np.zeros(lab.shape, bool)
    d0, d1 = lab[1:] != lab[:-1], lab[:, 1:] != lab[:, :-1]
    b[1:] |= d0
    b[:-1] |= d0
    b[:, 1:] |= d1
    b[:, :-1] |= d1
    t = b.astype(np.float32)[None]
    return t, np.ones_like(t)


@pytest.fixture(scope="module")
def toy():
    """A tiny 'EM' problem: blocks of cells with dark membranes and noise."""
    rng = np.random.default_rng(3)
    lab = (np.add.outer(np.arange(64) // 11, (np.arange(64) // 13) * 10) + 1).astype(np.uint32)
    bnd = _fast_boundary_targets(lab, "boundary")[0][0] > 0
    img = np.where(bnd, 0.15, 0.75) + rng.normal(0, 0.08, lab.shape)
    return np.clip(img, 0, 1).astype(np.float32), lab


def _net(seed=0):
    torch.manual_seed(seed)
    return UNet(widths=(4, 8, 16))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


RECIPE = TrainRecipe(steps=8, batch_size=3, patch_size=32, lr=3e-3, seed=5)


def test_fast_targets_match_brute_force(toy):
    _, lab = toy
    assert np.array_equal(_fast_boundary_targets(lab, "b")[0], _boundary_targets(lab, "b")[0])


def test_same_seed_gives_identical_weights(toy):
    img, lab = toy
    a, b, c = _net(), _net(), _net()
    ha = train_network(a, img, lab, recipe=RECIPE, target_fn=_fast_boundary_targets)
    train_network(b, img, lab, recipe=RECIPE, target_fn=_fast_boundary_targets)
    train_network(c, img, lab, recipe=TrainRecipe(**{**RECIPE.to_dict(), "seed": 6}), target_fn=_fast_boundary_targets)
    assert len(ha.loss) == RECIPE.steps and ha.steps_run == RECIPE.steps
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_deterministic_flag_restored(toy):
    img, lab = toy
    before = torch.are_deterministic_algorithms_enabled()
    train_network(_net(), img, lab, recipe=TrainRecipe(steps=1, batch_size=1, patch_size=16),
                  target_fn=_fast_boundary_targets)
    assert torch.are_deterministic_algorithms_enabled() == before


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(toy, tmp_path):
    img, lab = toy
    ref = _net()
    href = train_network(ref, img, lab, recipe=RECIPE, target_fn=_fast_boundary_targets)

    def stop_at_6(step, loss):
        if step == 6:
            raise _Interrupt

    net = _net()
    with pytest.raises(_Interrupt):
        train_network(net, img, lab, recipe=RECIPE, target_fn=_fast_boundary_targets, checkpoint_dir=tmp_path,
                      checkpoint_every=4, callback=stop_at_6)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name != CHECKPOINT_NAME]  # no temp files left
    resumed = _net()  # a fresh process would rebuild the network from scratch
    h = train_network(resumed, img, lab, recipe=RECIPE, target_fn=_fast_boundary_targets, checkpoint_dir=tmp_path,
                      checkpoint_every=4)
    assert h.resumed_from == 4 and h.steps_run == RECIPE.steps - 4
    assert h.loss == href.loss
    assert _same_weights(resumed, ref)
    # a finished checkpoint resumes to "nothing left to do"
    again = _net()
    h2 = train_network(again, img, lab, recipe=RECIPE, target_fn=_fast_boundary_targets, checkpoint_dir=tmp_path)
    assert h2.steps_run == 0 and _same_weights(again, ref)


def test_more_steps_extend_a_finished_run_to_the_weights_of_one_longer_run(toy, tmp_path):
    img, lab = toy
    short, longer = (TrainRecipe(steps=s, batch_size=1, patch_size=16) for s in (3, 7))
    ref = _net()
    href = train_network(ref, img, lab, recipe=longer, target_fn=_fast_boundary_targets)
    train_network(_net(), img, lab, recipe=short, target_fn=_fast_boundary_targets, checkpoint_dir=tmp_path)
    extended = _net()
    h = train_network(extended, img, lab, recipe=longer, target_fn=_fast_boundary_targets, checkpoint_dir=tmp_path)
    assert h.resumed_from == 3 and h.steps_run == 4
    assert h.loss == href.loss
    assert _same_weights(extended, ref)
    # the checkpoint is now at step 7: a 3-step run cannot be served from it
    with pytest.raises(InputValueError, match="past this run's steps=3"):
        train_network(_net(), img, lab, recipe=short, target_fn=_fast_boundary_targets, checkpoint_dir=tmp_path)


def test_checkpoint_of_another_run_is_refused(toy, tmp_path):
    img, lab = toy
    train_network(_net(), img, lab, recipe=TrainRecipe(steps=2, batch_size=1, patch_size=16),
                  target_fn=_fast_boundary_targets, checkpoint_dir=tmp_path)
    with pytest.raises(InputValueError, match="different run"):
        train_network(_net(), img, lab, recipe=TrainRecipe(steps=2, lr=5e-4, batch_size=1, patch_size=16),
                      target_fn=_fast_boundary_targets, checkpoint_dir=tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(FormatError, match=CHECKPOINT_NAME):
        train_network(_net(), img, lab, recipe=TrainRecipe(steps=2, batch_size=1, patch_size=16),
                      target_fn=_fast_boundary_targets, checkpoint_dir=tmp_path)


def test_checkpoint_holds_no_pickle(toy, tmp_path):
    img, lab = toy
    train_network(_net(), img, lab, recipe=TrainRecipe(steps=2, batch_size=1, patch_size=16),
                  target_fn=_fast_boundary_targets, checkpoint_dir=tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="np") as f:
        keys = set(f.keys())
        assert "rng/torch" in keys and any(k.startswith("optim/") for k in keys)
        assert "neuroadda_rt" in f.metadata()


def test_training_lowers_the_loss(toy):
    img, lab = toy
    net = _net()
    recipe = TrainRecipe(steps=60, batch_size=4, patch_size=32, lr=1e-2, augment=False, seed=0)
    h = train_network(net, img, lab, recipe=recipe, target_fn=_fast_boundary_targets)
    assert np.mean(h.loss[-10:]) < 0.6 * np.mean(h.loss[:5])
    # and the trained network separates membrane from cytoplasm on the full image
    with torch.no_grad():
        p = net(torch.from_numpy(img)[None, None]).numpy()[0, 0]
    bnd = _fast_boundary_targets(lab, "b")[0][0] > 0
    assert p[bnd].mean() > p[~bnd].mean() + 0.2


# ------------------------------------------------------------------------------ augmentation
def test_mirror_index_matches_scipy_mirror():
    from scipy import ndimage

    n = 7
    idx = np.arange(-20, 27)
    a = np.arange(n, dtype=np.float64) * 10
    ref = ndimage.map_coordinates(a, idx[None].astype(np.float64), order=0, mode="mirror")
    assert np.array_equal(a[_mirror_index(idx, n)], ref)


@pytest.mark.parametrize("seed", range(6))
def test_rigid_augmentation_is_the_same_pixel_permutation(seed):
    """Image and labels go through one permutation of pixel indices (brute-force check)."""
    s = 9
    rng = np.random.default_rng(seed)
    idx = np.arange(s * s).reshape(s, s)
    img, lab = augment_pair(idx.astype(np.float32), idx, np.random.default_rng(seed), elastic=False,
                            intensity=False)
    assert np.array_equal(img, lab.astype(np.float32))
    assert np.array_equal(np.sort(lab.ravel()), idx.ravel())  # a permutation
    # brute force: rebuild the expected result from the drawn flips / rotation
    geom = _sample_geometry(np.random.default_rng(seed), s, elastic=False)
    expected = np.empty_like(idx)
    for i in range(s):
        for j in range(s):
            y, x = i, j
            if geom.flip_x:
                x = s - 1 - x
            if geom.flip_y:
                y = s - 1 - y
            for _ in range(geom.rot90):  # np.rot90 (k=1): out[i, j] = in[j, s-1-i]
                y, x = x, s - 1 - y
            expected[i, j] = idx[y, x]
    assert np.array_equal(lab, expected)
    del rng


@pytest.mark.parametrize("seed", range(4))
def test_elastic_augmentation_keeps_labels_aligned(seed):
    """Labels are read at the rounded coordinates the image is interpolated at (brute force)."""
    s = 24
    rng = np.random.default_rng(100 + seed)
    image = rng.random((s, s)).astype(np.float32)
    labels = np.arange(s * s).reshape(s, s)
    geom = _sample_geometry(np.random.default_rng(seed), s, elastic=True)
    img, lab = _apply_geometry(image, labels, geom)
    c = geom.coordinates(s)

    def mirror(v):
        v = int(v)
        period = 2 * (s - 1)
        v %= period
        return period - v if v >= s else v

    def pixel(y, x):
        return float(image[mirror(y), mirror(x)])

    for i in range(s):
        for j in range(s):
            y, x = c[0, i, j], c[1, i, j]
            yr, xr = int(np.rint(y)), int(np.rint(x))
            assert lab[i, j] == labels[mirror(yr), mirror(xr)]
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            fy, fx = y - y0, x - x0
            ref = ((1 - fy) * (1 - fx) * pixel(y0, x0) + (1 - fy) * fx * pixel(y0, x0 + 1)
                   + fy * (1 - fx) * pixel(y0 + 1, x0) + fy * fx * pixel(y0 + 1, x0 + 1))
            assert abs(img[i, j] - ref) < 1e-5
    # the deformation is a real one, not the identity
    assert np.abs(geom.displacement).max() > 0.5


def test_augmentation_moves_image_and_labels_together_on_a_label_image():
    """With jitter off, an image that *is* a function of the labels stays that function."""
    rng = np.random.default_rng(1)
    lab = (np.add.outer(np.arange(48) // 8, (np.arange(48) // 6) * 7) + 1).astype(np.int64)
    lut = rng.random(lab.max() + 1).astype(np.float32)
    for seed in range(5):
        img, out = augment_pair(lut[lab], lab, np.random.default_rng(seed), elastic=False, intensity=False)
        assert np.array_equal(img, lut[out])


def test_intensity_jitter_stays_in_range_and_is_seeded():
    x = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    lab = np.zeros((16, 16), np.uint32)
    a, _ = augment_pair(x, lab, np.random.default_rng(2))
    b, _ = augment_pair(x, lab, np.random.default_rng(2))
    assert np.array_equal(a, b)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert not np.allclose(a, x)


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_typed_errors(toy):
    img, lab = toy
    with pytest.raises(ShapeError):
        train_network(_net(), img, lab[:10], recipe=RECIPE, target_fn=_fast_boundary_targets)
    with pytest.raises(ShapeError):
        train_network(_net(), [img, img], [lab], recipe=RECIPE, target_fn=_fast_boundary_targets)
    with pytest.raises(TypeError):
        train_network(_net(), img, lab.astype(np.float32), recipe=RECIPE, target_fn=_fast_boundary_targets)
    with pytest.raises(InputValueError):
        TrainRecipe(steps=0)
    with pytest.raises(InputValueError):
        TrainRecipe(lr=-1.0)
    with pytest.raises(ShapeError):
        augment_pair(np.zeros((4, 5), np.float32), np.zeros((4, 5), np.int32), np.random.default_rng(0))


# ------------------------------------------------------------------------------ packages
def test_finetune_and_scratch_write_complete_packages(tmp_path):
    """Both return verified packages with a tuned threshold, new reference features and the curve."""
    from pathlib import Path

    from neuroadda_rt.evaluation import stored_threshold
    from neuroadda_rt.package import load_model
    from neuroadda_rt.study.synthetic import make_domain
    from neuroadda_rt.training import finetune, train_from_scratch

    src = load_model(Path(__file__).resolve().parent / "assets" / "tiny_model")
    img, lab = make_domain(None, (2, 64, 64), seed=11)
    kw = dict(steps=3, batch_size=2, patch_size=32, seed=1)
    ft = finetune(src, img, lab, out=tmp_path / "ft", data={"organism": "mouse", "voxel_size_nm": [30, 6, 6]}, **kw)
    sc = train_from_scratch(src, img, lab, out=tmp_path / "sc", **kw)
    for pkg, mode in ((ft, "finetune"), (sc, "scratch")):
        again = load_model(pkg.path)  # verifies every checksum
        m = again.metadata
        assert m["training"]["mode"] == mode and m["training"]["n_samples"] == 2
        assert m["training"]["source_model"]["name"] == src.name
        assert m["network"] == src.config
        # Issue 19/15: the new package describes the annotated tiles, not the source; the source's own
        # description is kept under training.source_model
        assert m["training"]["source_model"]["organism"] == src.organism
        assert m["training"]["source_model"]["voxel_size_nm"] == src.voxel_size_nm
        if mode == "finetune":
            assert m["organism"] == "mouse" and list(m["voxel_size_nm"]) == [30, 6, 6]
        else:
            assert m["organism"] is None and m["voxel_size_nm"] is None and m["modality"] is None
        assert len(m["metrics"]["training"]["loss"]) == 3 and len(pkg.history.loss) == 3
        assert 0.0 < stored_threshold(again) < 1.0
        assert m["extra"]["segmentation"]["threshold"] == m["metrics"]["segmentation_threshold"]
        # reference features recomputed on the training tiles (64 px images, reference tile 64)
        assert again.reference_features.shape == (2, src.reference_features.shape[1])
        assert m["reference_features"]["tile_size"] == 64
    with pytest.raises(InputValueError, match="expected data keys"):
        finetune(src, img, lab, out=tmp_path / "bad", data={"species": "fly"}, **kw)
    st_src = {k: v for k, v in src.unet().state_dict().items() if k.endswith("weight")}
    ft_net, sc_net = ft.unet(), sc.unet()
    # fine-tuning starts from the source: a few small steps stay close to it; scratch does not
    d_ft = max(float((ft_net.state_dict()[k].float() - v.float()).abs().max()) for k, v in st_src.items())
    d_sc = max(float((sc_net.state_dict()[k].float() - v.float()).abs().max()) for k, v in st_src.items())
    assert d_ft < d_sc


def test_finetune_mix_is_the_midpoint_of_source_and_plain_finetune(tmp_path):
    """finetune's default (WiSE-FT, mix 0.5) against float64 NumPy of the source and a plain (mix=1) run."""
    from pathlib import Path

    from neuroadda_rt.package import load_model
    from neuroadda_rt.study.synthetic import make_domain
    from neuroadda_rt.training import DEFAULT_FINETUNE_MIX, finetune, interpolate_weights

    src = load_model(Path(__file__).resolve().parent / "assets" / "tiny_model")
    img, lab = make_domain(None, (2, 64, 64), seed=11)
    kw = dict(steps=3, batch_size=2, patch_size=32, seed=1)
    plain = finetune(src, img, lab, out=tmp_path / "plain", mix=1.0, **kw)
    mixed = finetune(src, img, lab, out=tmp_path / "mixed", **kw)
    assert DEFAULT_FINETUNE_MIX == 0.5
    s0, s1, sm = src.unet().state_dict(), plain.unet().state_dict(), mixed.unet().state_dict()
    for k, v in sm.items():
        if v.is_floating_point():
            ref = 0.5 * s0[k].double().numpy() + 0.5 * s1[k].double().numpy()
            np.testing.assert_allclose(v.double().numpy(), ref, rtol=1e-6, atol=1e-7)
        else:
            assert np.array_equal(v.numpy(), s1[k].numpy())
    assert mixed.metadata["training"]["weight_interpolation"]["mix"] == 0.5
    assert "weight_interpolation" not in plain.metadata["training"]
    assert mixed.history.loss == plain.history.loss  # the same training run, interpolated afterwards
    for bad in (0, 1.5, -0.1, float("nan"), True, "half"):
        with pytest.raises(InputValueError, match="expected mix"):
            finetune(src, img, lab, out=tmp_path / "bad", mix=bad, **kw)
    with pytest.raises(InputValueError, match="one architecture"):
        interpolate_weights({"a": s0[next(iter(s0))]}, {"b": s0[next(iter(s0))]}, 0.5)


def test_train_and_package_takes_explicit_metadata(toy, tmp_path):
    """The one train-then-package path: caller's metadata, threshold tiles, reference tiles, thinned curve."""
    from neuroadda_rt.package import load_model
    from neuroadda_rt.training import train_and_package

    img, lab = toy
    raw = (img * 255).astype(np.uint8)
    pkg = train_and_package(_net(), [raw], [lab], recipe=TrainRecipe(steps=4, batch_size=2, patch_size=32),
                            out=tmp_path / "m", name="toy", organism="synthetic", modality="synthetic EM",
                            voxel_size_nm=(4.0, 4.0), training={"mode": "zoo source"}, extra={"domain": "toy"},
                            reference_tiles=raw[None, :32, :32].repeat(3, 0), reference_info={"tile_size": 32},
                            threshold_images=[raw[:48, :48]], threshold_labels=[lab[:48, :48]], loss_every=2)
    m = load_model(pkg.path).metadata
    assert m["name"] == "toy" and m["organism"] == "synthetic" and m["voxel_size_nm"] == [4.0, 4.0]
    assert m["training"]["mode"] == "zoo source" and m["training"]["n_samples"] == 1
    assert m["normalization"]["rule"] == "dtype"
    assert m["extra"]["domain"] == "toy" and m["extra"]["segmentation"]["tuned_on"].startswith("1 ")
    assert m["reference_features"]["n_tiles"] == 3 and m["reference_features"]["tile_size"] == 32
    assert m["metrics"]["training"]["loss_every"] == 2 and len(m["metrics"]["training"]["loss"]) == 2
    assert len(pkg.history.loss) == 4
