"""UNet: shapes, heads, padding/cropping, config round trip, BatchNorm folding."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from neuroadda_rt.errors import InputValueError, ShapeError  # noqa: E402
from neuroadda_rt.models import UNet, fold_batchnorm, unet_from_config  # noqa: E402


def _randomise_bn(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return net.eval()


@pytest.mark.parametrize("dim,head,ch", [(2, "boundary", 1), (2, "affinities", 2), (3, "boundary", 1),
                                         (3, "affinities", 3)])
def test_output_shapes_and_range(dim, head, ch):
    torch.manual_seed(0)
    net = UNet(dim=dim, widths=(4, 8, 16), head=head).eval()
    shape = (2, 1, 37, 53) if dim == 2 else (1, 1, 9, 13, 11)
    x = torch.rand(*shape)
    with torch.no_grad():
        y = net(x)
        z = net.encode(x)
    assert y.shape == (shape[0], ch, *shape[2:])
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert z.shape == (shape[0], 16, *[-(-s // 4) for s in shape[2:]])
    assert net.out_channels == ch


def test_default_architecture():
    net = UNet()
    assert net.config == {"dim": 2, "in_channels": 1, "widths": [16, 32, 64, 128], "head": "boundary"}
    assert net.depth == 4 and net.multiple == 8
    assert UNet(depth=3).config["widths"] == [16, 32, 64]


def test_padding_matches_manual_reflect_pad_and_crop():
    """forward on an odd size == forward on the numpy-reflect-padded input, cropped back."""
    torch.manual_seed(1)
    net = _randomise_bn(UNet(widths=(4, 8, 16)))
    x = np.random.default_rng(0).random((2, 1, 37, 53)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (0, 0), (0, 3), (0, 3)), mode="reflect")  # 37->40, 53->56 (multiples of 4)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).numpy()
        yp = net(torch.from_numpy(xp)).numpy()[:, :, :37, :53]
        z = net.encode(torch.from_numpy(x)).numpy()
        zp = net.encode(torch.from_numpy(xp)).numpy()
    # same arithmetic up to the convolution algorithm's summation order
    np.testing.assert_allclose(y, yp, rtol=0, atol=1e-5)
    np.testing.assert_allclose(z, zp, rtol=0, atol=1e-5)


def test_config_rebuilds_identical_network():
    torch.manual_seed(2)
    net = _randomise_bn(UNet(dim=3, widths=(3, 6), head="affinities"))
    clone = unet_from_config(net.config)
    clone.load_state_dict(net.state_dict())
    clone.eval()
    x = torch.rand(1, 1, 6, 8, 10)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), net(x), rtol=0, atol=0)


def test_fold_batchnorm_same_function_and_no_bn():
    torch.manual_seed(3)
    net = _randomise_bn(UNet(widths=(4, 8, 16)))
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # original untouched
    x = torch.rand(3, 1, 24, 20)
    with torch.no_grad():
        assert float((folded(x) - net(x)).abs().max()) < 1e-5
        assert float((folded.encode(x) - net.encode(x)).abs().max()) < 1e-5


def test_bad_inputs():
    with pytest.raises(InputValueError):
        UNet(dim=4)
    with pytest.raises(InputValueError):
        UNet(head="semantic")
    with pytest.raises(InputValueError):
        UNet(widths=())
    with pytest.raises(InputValueError):
        unet_from_config({"dim": 2, "bogus": 1})
    with pytest.raises(ShapeError):
        UNet(widths=(4, 8)).encode(torch.rand(1, 8, 8))


@pytest.mark.parametrize("level", [0, 1, 2, -1, -3])
def test_feature_level_encode_is_that_levels_activations(level):
    """``encode`` at a feature level equals the map a hook on that encoder block records in a full forward pass."""
    torch.manual_seed(4)
    net = _randomise_bn(UNet(widths=(4, 8, 16)))
    shallow = unet_from_config({**net.config, "feature_level": level}).eval()
    shallow.load_state_dict(net.state_dict())
    seen = {}
    hook = net.down[level].register_forward_hook(lambda m, i, o: seen.setdefault("map", o))
    x = torch.rand(2, 1, 37, 53)
    with torch.no_grad():
        net(x)
        got = shallow.encode(x)
        torch.testing.assert_close(shallow(x), net(x), rtol=0, atol=0)  # the network itself is unchanged
    hook.remove()
    torch.testing.assert_close(got, seen["map"], rtol=0, atol=0)
    lv = level % 3
    assert got.shape == (2, (4, 8, 16)[lv], 40 // 2**lv, 56 // 2**lv)


def test_feature_level_config_round_trip_and_default_form():
    assert "feature_level" not in UNet(widths=(4, 8, 16)).config  # bottleneck default: old configs unchanged
    assert "feature_level" not in UNet(widths=(4, 8, 16), feature_level=2).config
    assert "feature_level" not in UNet(widths=(4, 8, 16), feature_level=-1).config
    cfg = UNet(widths=(4, 8, 16), feature_level=-2).config
    assert cfg["feature_level"] == 1 and unet_from_config(cfg).feature_level == 1


@pytest.mark.parametrize("bad", [3, -4, 1.5, True, "1"])
def test_feature_level_out_of_range_or_not_an_integer_is_refused(bad):
    with pytest.raises(InputValueError, match="feature_level"):
        UNet(widths=(4, 8, 16), feature_level=bad)


def test_batchnorm_statistics_from_sets_each_layers_batch_statistics_and_restores_momentum():
    from neuroadda_rt.models import _Block, batchnorm_statistics_from

    torch.manual_seed(0)
    net = UNet(widths=(4, 8, 16))
    first = next(m for m in net.modules() if isinstance(m, _Block))
    seen = []
    hook = first.conv1.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().double().numpy()))
    x = np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)  # a multiple of 4: no padding
    assert batchnorm_statistics_from(net, x) is net and not net.training
    hook.remove()
    act = seen[0]  # (N, C, H, W): conv1's output the BatchNorm normalised in that pass
    np.testing.assert_allclose(first.bn1.running_mean.double().numpy(), act.mean(axis=(0, 2, 3)), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(first.bn1.running_var.double().numpy(),
                               act.transpose(1, 0, 2, 3).reshape(act.shape[1], -1).var(axis=1, ddof=1), rtol=1e-4)
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(int(m.num_batches_tracked) == 1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
