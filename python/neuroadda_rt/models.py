"""The UNet that every step of NeuroADDA runs: encoder features for MMD², full network for
boundary / affinity probabilities.

The network pads its input (reflect) up to a multiple of ``2**(depth-1)`` *inside* ``forward``
and ``encode``, and crops the output back. Because the padding is part of the traced graph,
the exported ONNX files (and the TensorRT engines built from them) carry exactly the same
padding, so every runtime gives the same answer for any tile size (see ``docs/method.md``).

PyTorch is imported lazily: ``import neuroadda_rt.models`` itself needs it, but
``import neuroadda_rt`` does not.
"""

from __future__ import annotations

import copy
import operator
import os
from typing import Any

from .errors import InputValueError, IntegrityError, ShapeError, require

torch = require("torch", "torch")
nn = torch.nn
F = torch.nn.functional

#: Output channels per representation and dimensionality (nearest-neighbour affinities).
HEAD_CHANNELS = {("boundary", 2): 1, ("boundary", 3): 1, ("affinities", 2): 2, ("affinities", 3): 3}

_DEFAULT_CONFIG: dict[str, Any] = {
    "dim": 2,
    "in_channels": 1,
    "widths": [16, 32, 64, 128],
    "head": "boundary",
    "feature_level": None,
}


def _validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    unknown = set(cfg) - set(_DEFAULT_CONFIG) - {"depth"}
    if unknown:
        raise InputValueError(f"expected UNet config keys among {sorted(_DEFAULT_CONFIG) + ['depth']}, "
                              f"got unknown {sorted(unknown)}")
    out = dict(_DEFAULT_CONFIG)
    out.update({k: v for k, v in cfg.items() if k != "depth"})
    out["widths"] = [int(w) for w in out["widths"]]
    if "depth" in cfg and cfg["depth"] is not None and int(cfg["depth"]) != len(out["widths"]):
        # depth given without widths: derive widths by doubling from the first one
        if "widths" in cfg:
            raise InputValueError(f"expected depth == len(widths), got depth={cfg['depth']} "
                                  f"and widths={out['widths']}")
        d = int(cfg["depth"])
        if d < 1:
            raise InputValueError(f"expected depth >= 1, got {d}")
        out["widths"] = [out["widths"][0] * 2**i for i in range(d)]
    if out["dim"] not in (2, 3):
        raise InputValueError(f"expected dim 2 or 3, got {out['dim']!r}")
    if out["head"] not in ("boundary", "affinities"):
        raise InputValueError(f"expected head 'boundary' or 'affinities', got {out['head']!r}")
    if len(out["widths"]) < 1 or min(out["widths"]) < 1:
        raise InputValueError(f"expected a non-empty list of positive widths, got {out['widths']}")
    if int(out["in_channels"]) < 1:
        raise InputValueError(f"expected in_channels >= 1, got {out['in_channels']}")
    out["in_channels"] = int(out["in_channels"])
    out["depth"] = len(out["widths"])
    lvl = out["feature_level"]
    if lvl is not None:
        if isinstance(lvl, bool) or not hasattr(lvl, "__index__"):
            raise InputValueError(f"expected an integer feature_level, got {lvl!r}")
        lvl = operator.index(lvl)
        if not -out["depth"] <= lvl < out["depth"]:
            raise InputValueError(f"expected feature_level in [{-out['depth']}, {out['depth'] - 1}] for "
                                  f"{out['depth']} levels, got {lvl}")
        lvl %= out["depth"]
    # the bottleneck is the default and is not written out, so older configs keep their form
    out["feature_level"] = None if lvl is None or lvl == out["depth"] - 1 else lvl
    return out


class _Block(nn.Module):
    """Two (conv 3, BatchNorm, ReLU) layers; zero padding keeps the size."""

    def __init__(self, dim: int, cin: int, cout: int):
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d
        self.conv1 = conv(cin, cout, 3, padding=1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.bn2 = bn(cout)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class UNet(nn.Module):
    """A 2-D or 3-D UNet with BatchNorm + ReLU and a sigmoid head.

    Parameters
    ----------
    dim : {2, 3}
        Spatial dimensionality; inputs are ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
    in_channels : int
        Input channels (1 for EM).
    widths : sequence of int
        Channels per level, top to bottom; ``depth = len(widths)``. Default ``16-32-64-128``.
    depth : int, optional
        Number of levels when ``widths`` is not given (widths double from 16).
    head : {"boundary", "affinities"}
        ``"boundary"``: 1 output channel; ``"affinities"``: 2 (2-D) or 3 (3-D) nearest-neighbour
        affinity channels.
    feature_level : int, optional
        The encoder level whose activations ``encode`` returns (and the exported encoder outputs):
        0 is the first, full-resolution level, ``depth - 1`` (the default) the bottleneck. It does
        not change the network, its weights or ``forward``; source ranking uses it (see
        ``docs/method.md``: a shallow level's style statistics rank sources better than the
        augmentation-invariant bottleneck).

    Notes
    -----
    ``forward`` returns sigmoid probabilities; ``logits`` the pre-sigmoid values; ``encode`` the
    activations of level ``feature_level`` (by default the bottleneck, ``(N, widths[-1],
    ceil(H / 2**(depth-1)), ...)``). Inputs whose spatial
    sizes are not multiples of ``2**(depth-1)`` are reflect-padded at the high end and the
    output cropped back, so any size ``>= 2**(depth-1)`` works. ``config`` rebuilds the network:
    ``UNet(**net.config)``. Inputs are not modified.

    Examples
    --------
    >>> import torch
    >>> from neuroadda_rt.models import UNet
    >>> net = UNet(widths=(4, 8, 16)).eval()
    >>> net(torch.rand(2, 1, 37, 53)).shape
    torch.Size([2, 1, 37, 53])
    >>> net.encode(torch.rand(2, 1, 37, 53)).shape
    torch.Size([2, 16, 10, 14])
    """

    def __init__(self, dim: int = 2, in_channels: int = 1, widths=(16, 32, 64, 128), *,
                 depth: int | None = None, head: str = "boundary", feature_level: int | None = None):
        super().__init__()
        cfg = {"dim": dim, "in_channels": in_channels, "head": head, "feature_level": feature_level}
        if depth is not None and tuple(widths) == (16, 32, 64, 128):
            cfg["depth"] = depth
        else:
            cfg["widths"] = list(widths)
            if depth is not None:
                cfg["depth"] = depth
        cfg = _validate_config(cfg)
        self._config = cfg
        d, w = cfg["dim"], cfg["widths"]
        self.dim = d
        self.depth = len(w)
        self.multiple = 2 ** (self.depth - 1)
        self.feature_level = self.depth - 1 if cfg["feature_level"] is None else cfg["feature_level"]
        self.out_channels = HEAD_CHANNELS[(cfg["head"], d)]
        conv = nn.Conv2d if d == 2 else nn.Conv3d
        up = nn.ConvTranspose2d if d == 2 else nn.ConvTranspose3d
        self.down = nn.ModuleList()
        cin = cfg["in_channels"]
        for width in w:
            self.down.append(_Block(d, cin, width))
            cin = width
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i in range(self.depth - 2, -1, -1):
            self.ups.append(up(w[i + 1], w[i], 2, stride=2))
            self.up_blocks.append(_Block(d, 2 * w[i], w[i]))
        self.head = conv(w[0], self.out_channels, 1)

    @property
    def config(self) -> dict[str, Any]:
        """A JSON-able dict that rebuilds this architecture: ``UNet(**config)``."""
        c = copy.deepcopy(self._config)
        c.pop("depth", None)
        if c.get("feature_level") is None:
            c.pop("feature_level", None)
        return c

    # -- padding shared by forward and encode -------------------------------------------------
    def _pad(self, x):
        if x.dim() != self.dim + 2:
            raise ShapeError(f"expected a {self.dim + 2}-D input (N, C, {'D, ' if self.dim == 3 else ''}H, W), "
                             f"got shape {tuple(x.shape)}")
        m = self.multiple
        if m == 1:
            return x
        pads = []
        # F.pad lists pads from the last axis backwards: (W_lo, W_hi, H_lo, H_hi, ...).
        # Written as arithmetic (no Python branch on the size) so the exporters keep it symbolic.
        for ax in range(x.dim() - 1, 1, -1):
            pads += [0, (m - x.shape[ax] % m) % m]
        return F.pad(x, pads, mode="reflect")

    def _encode_levels(self, x, last: int | None = None):
        skips = []
        for i, block in enumerate(self.down[: None if last is None else last + 1]):
            if i > 0:
                x = F.max_pool2d(x, 2) if self.dim == 2 else F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        return skips

    def encode(self, x):
        """Activations of level ``feature_level`` of the (padded) input (deeper levels are not run).

        By default the bottleneck, ``(N, widths[-1], *ceil(spatial / 2**(depth-1)))``; level ``k``
        gives ``(N, widths[k], *padded_spatial / 2**k)``.
        """
        return self._encode_levels(self._pad(x), last=self.feature_level)[-1]

    def logits(self, x):
        """Pre-sigmoid outputs with the input's spatial shape."""
        spatial = x.shape[2:]
        skips = self._encode_levels(self._pad(x))
        y = skips[-1]
        for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips[:-1])):
            y = block(torch.cat([up(y), skip], dim=1))
        y = self.head(y)
        if self.dim == 2:
            return y[:, :, : spatial[0], : spatial[1]]
        return y[:, :, : spatial[0], : spatial[1], : spatial[2]]

    def forward(self, x):
        """Sigmoid probabilities ``(N, out_channels, *spatial)``."""
        return torch.sigmoid(self.logits(x))

    def extra_repr(self) -> str:
        return f"config={self.config}"


class _EncoderWrapper(nn.Module):
    """``forward = encode`` so the exporters trace the encoder alone."""

    def __init__(self, net: UNet):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.encode(x)


def fold_batchnorm(net: UNet) -> UNet:
    """A copy of ``net`` in eval mode with every BatchNorm folded into the preceding convolution.

    The copy computes the same function as ``net.eval()`` (up to float rounding) with plain
    convolutions, which is what gets exported. ``net`` is not modified.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(net).eval()
    for mod in folded.modules():
        if isinstance(mod, _Block):
            mod.conv1 = fuse_conv_bn_eval(mod.conv1, mod.bn1)
            mod.bn1 = nn.Identity()
            mod.conv2 = fuse_conv_bn_eval(mod.conv2, mod.bn2)
            mod.bn2 = nn.Identity()
    return folded


def batchnorm_statistics_from(net: UNet, x) -> UNet:
    """Set every BatchNorm's running statistics to those of the batch ``x`` and put ``net`` in eval mode.

    One forward pass in train mode with a cumulative average (``momentum=None``); each layer's
    momentum is restored afterwards. For untrained networks in tests, benchmarks and test assets:
    with the default statistics (mean 0, variance 1) their outputs and pooled features hardly vary
    across tiles; with the data's statistics they spread like a trained network's.

    Parameters
    ----------
    net : UNet
        Modified in place (BatchNorm buffers and the train/eval flag) and returned.
    x : numpy.ndarray or torch.Tensor
        A float input batch ``(N, C, *spatial)`` in the network's input range.

    Returns
    -------
    UNet
        ``net``, in eval mode.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
    batch = x if torch.is_tensor(x) else torch.from_numpy(x)
    net.train()
    with torch.no_grad():
        net(batch.float())
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return net.eval()


def unet_from_config(config: dict[str, Any]) -> UNet:
    """Build a :class:`UNet` from a ``config`` dict (as stored in ``model.json``)."""
    if not isinstance(config, dict):
        raise InputValueError(f"expected a dict network config, got {type(config).__name__}")
    cfg = _validate_config(dict(config))
    return UNet(dim=cfg["dim"], in_channels=cfg["in_channels"], widths=cfg["widths"], head=cfg["head"],
                feature_level=cfg["feature_level"])


def load_unet(config: dict[str, Any], weights: str | os.PathLike) -> UNet:
    """A :class:`UNet` of ``config`` with the state dict of a ``.safetensors`` file, in eval mode.

    Raises :class:`~neuroadda_rt.errors.IntegrityError` naming the file when the weights do not
    fit the config.
    """
    st = require("safetensors.torch", "runtime")
    net = unet_from_config(config)
    try:
        net.load_state_dict(st.load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise IntegrityError(f"{weights}: weights do not match the network config {config}: {exc}") from exc
    return net.eval()
