"""Small model packages and synthetic domains for the workflow tests (ranking, selection, workflow, CLI).

The ranking only needs encoders whose reference features come from each domain, so every package
is the same small untrained, seeded UNet (exported once: the slow part) with reference features
computed on tiles of its own synthetic domain. Domains 0 and 1 are close relatives (small drift), domain 2 is far away, so a target of
domain 0 must rank source 0 first and source 2 last under every encoder.
"""

from __future__ import annotations

from pathlib import Path


TILE = 32
WIDTHS = (4, 8, 16)


def domains():
    """Three synthetic styles: 'near_a' and 'near_b' close relatives, 'far' different."""
    from neuroadda_rt.study.synthetic import DomainStyle

    base = DomainStyle(name="near_a", cell_diameter_px=14.0, membrane_thickness_px=2.0, blur_sigma_px=0.6)
    return [base, base.replace(name="near_b", membrane_darkness=0.5, photons=45.0),
            base.replace(name="far", invert=True, cell_diameter_px=30.0, blur_sigma_px=2.0, gamma=1.8)]


def volume(style, seed: int, shape=(2, 96, 96)):
    from neuroadda_rt.study.synthetic import make_domain

    return make_domain(style, shape, seed=seed)


def build_zoo(root: Path, *, n_ref: int = 48) -> list[Path]:
    """Write one package per domain under ``root``; returns their paths.

    One network is exported once (the slow part) and re-saved with each domain's reference
    features, so every source shares its encoder and differs only in its training data.
    """
    import torch

    from neuroadda_rt.models import UNet
    from neuroadda_rt.package import save_model
    from neuroadda_rt.tiles import sample_tiles

    styles = domains()
    # PyTorch's default initialisation gives an encoder whose pooled features spread with the
    # data (the checked-in tiny model's are nearly constant, useless for a ranking test).
    torch.manual_seed(7)
    net = UNet(widths=WIDTHS).eval()
    img0, _ = volume(styles[0], seed=100)
    base = save_model(net, root / "_base", name="base", reference_tiles=sample_tiles(img0, 8, TILE, seed=0).tiles)
    paths = []
    for i, style in enumerate(styles):
        img, _ = volume(style, seed=100 + i)
        tiles = sample_tiles(img, n_ref, TILE, seed=i).tiles
        p = root / "zoo" / style.name
        save_model(base, p, name=style.name, organism="synthetic", modality="synthetic",
                   reference_tiles=tiles, reference_info={"tile_size": TILE, "seed": i})
        paths.append(p)
    return paths


_BUILT: dict[str, list[Path]] = {}


def shared_zoo(tmp_path_factory) -> list[Path]:
    """The zoo of :func:`build_zoo`, built once per test process (treat it as read-only)."""
    if "zoo" not in _BUILT:
        _BUILT["zoo"] = build_zoo(tmp_path_factory.mktemp("workflow_zoo"))
    return _BUILT["zoo"]
