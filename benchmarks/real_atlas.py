"""The domain atlas on the eight real EM sets of ``../shared/em_data`` (issue 16 item 3).

The protocol is fixed in ``docs/results.md`` §4.1 (written before the results): every package of the real-EM
zoo embeds every domain (64 tiles of 96 px, seed 0, its own intensity rule and pooling); per source the
symmetrised MMD² matrix of the eight banks, scaled by its median off-diagonal entry; the atlas is the mean over
sources; Mantel tests against the species tree and a modality grouping, per source and for the mean.

    python benchmarks/real_atlas.py                       # writes docs/results/real_atlas.json + the figure
    python benchmarks/real_atlas.py --zoo path/to/zoo     # another zoo of packages
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

import neuroadda_rt as nr
from neuroadda_rt._sources import PackageSource
from neuroadda_rt.datasets import Dataset, resolve_data_root
from neuroadda_rt.io import read_image_2d

REPO = Path(__file__).resolve().parents[1]
N_TILES, TILE, SEED, N_PERM = 64, 96, 0, 999

#: domain -> (species tip in the shipped tree, modality group)
DOMAINS = {
    "isbi2012": ("Drosophila_melanogaster", "ssTEM"),
    "gerhard_l3_vnc": ("Drosophila_melanogaster", "ssTEM"),
    "gala_fibsem": ("Drosophila_melanogaster", "FIB-SEM"),
    "epfl_hippocampus": ("Mus_musculus", "FIB-SEM"),
    "kasthuri_cortex": ("Mus_musculus", "serial SEM"),
    "dvid_fibsem": ("Drosophila_melanogaster", "FIB-SEM"),
    "fafb_temca2": ("Drosophila_melanogaster", "ssTEM"),
    "celegans_neubias": ("Caenorhabditis_elegans", "unknown"),
}


def load_domains(root: Path) -> dict[str, np.ndarray | object]:
    """Each domain as something ``sample_tiles`` reads (a Volume or an array)."""
    out: dict = {}
    for name in ("isbi2012", "gerhard_l3_vnc", "gala_fibsem", "epfl_hippocampus", "kasthuri_cortex"):
        ds = Dataset.from_json(REPO / "examples" / "datasets" / f"{name}.json", data_root=root)
        out[name] = ds.image("train" if "train" in ds.splits else ds.splits[0])  # Kasthuri: unlabelled "test"
    dvid = sorted((root / "drosophila_fibsem_dvid_grayscale" / "grayscale_maps").glob("iso.*.png"))
    out["dvid_fibsem"] = np.stack([read_image_2d(p) for p in dvid[150:]])  # clean sections only (§4.1)
    fafb = sorted(p for p in (root / "drosophila_fafb_temca2_tiles").rglob("*.jpg") if p.name != "black.jpg")
    out["fafb_temca2"] = np.stack([read_image_2d(p) for p in fafb])
    cel = sorted((root / "celegans_em_neubias" / "slices").glob("*.tif"))
    out["celegans_neubias"] = np.stack([read_image_2d(p) for p in cel])
    return out


def mantel(a: np.ndarray, b: np.ndarray, n_perm: int, seed: int) -> tuple[float, float]:
    """Pearson r of the upper triangles and its permutation p-value (rows and columns permuted together)."""
    iu = np.triu_indices(len(a), 1)

    def r(m):
        x, y = m[iu], b[iu]
        if x.std() == 0 or y.std() == 0:
            return float("nan")
        return float(np.corrcoef(x, y)[0, 1])

    obs = r(a)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        p = rng.permutation(len(a))
        hits += r(a[np.ix_(p, p)]) >= obs
    return obs, (hits + 1) / (n_perm + 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=None, help="zoo folder (default: default_zoo())")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "real_atlas.json"))
    ap.add_argument("--figure", default=str(REPO / "docs" / "figures" / "real_atlas.png"))
    args = ap.parse_args(argv)
    # default: $NEUROADDA_DATA, else ../shared/em_data beside the repository
    root = resolve_data_root(args.data_root or os.environ.get("NEUROADDA_DATA") or REPO.parent / "shared" / "em_data")
    zoo = nr.Zoo(args.zoo) if args.zoo else nr.default_zoo()
    domains = load_domains(root)
    names = list(DOMAINS)
    tiles = {n: nr.sample_tiles(domains[n], N_TILES, TILE, seed=SEED).tiles for n in names}
    from neuroadda_rt.atlas import _as_tree, _patristic, reference_species_tree, symmetrised_distance

    tree = _as_tree(reference_species_tree())
    species = [DOMAINS[n][0] for n in names]
    uniq = sorted(set(species))
    pat_u = _patristic(tree, uniq)
    phylo = np.array([[pat_u[uniq.index(a), uniq.index(b)] for b in species] for a in species])
    modality = np.array([[0.0 if DOMAINS[a][1] == DOMAINS[b][1] != "unknown" else 1.0 for b in names] for a in names])
    np.fill_diagonal(modality, 0.0)

    per_source, scaled = {}, []
    for pkg in zoo:
        src = PackageSource(pkg)
        banks = {n: src.embed(tiles[n], backend="auto", device="auto", batch_size=16) for n in names}
        m = symmetrised_distance(nr.mmd2_matrix([banks[n] for n in names]))
        off = m[~np.eye(len(names), dtype=bool)]
        s = m / np.median(off)
        scaled.append(s)
        per_source[pkg.name] = {"matrix": m.tolist(), "median_off_diagonal": float(np.median(off)),
                                "mantel_species": mantel(s, phylo, N_PERM, SEED),
                                "mantel_modality": mantel(s, modality, N_PERM, SEED),
                                "nearest": {n: names[int(np.argmin(np.where(np.eye(len(names))[i] > 0, np.inf, s[i])))]
                                            for i, n in enumerate(names)}}
        print(f"{pkg.name}: Mantel species r={per_source[pkg.name]['mantel_species'][0]:.3f} "
              f"p={per_source[pkg.name]['mantel_species'][1]:.3f}; modality r="
              f"{per_source[pkg.name]['mantel_modality'][0]:.3f} p={per_source[pkg.name]['mantel_modality'][1]:.3f}",
              file=sys.stderr)
    if not scaled:
        raise SystemExit("the zoo has no packages")
    mean = np.mean(scaled, axis=0)
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    link = linkage(squareform(mean, checks=False), method="average")
    result = {"protocol": "docs/results.md §4.1", "domains": names, "species": species,
              "modality": [DOMAINS[n][1] for n in names], "sources": list(per_source),
              "n_tiles": N_TILES, "tile_size": TILE, "seed": SEED,
              "mean_scaled": mean.tolist(), "mantel_species": mantel(mean, phylo, N_PERM, SEED),
              "mantel_modality": mantel(mean, modality, N_PERM, SEED), "per_source": per_source,
              "nearest": {n: names[int(np.argmin(np.where(np.eye(len(names))[i] > 0, np.inf, mean[i])))]
                          for i, n in enumerate(names)}}
    from neuroadda_rt import _atomic

    _atomic.write_json(Path(args.out), result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    im = ax0.imshow(mean, cmap="viridis")
    labels = [f"{n}\n({DOMAINS[n][0].split('_')[0][:4]}., {DOMAINS[n][1]})" for n in names]
    ax0.set_xticks(range(len(names)), labels, rotation=90, fontsize=7)
    ax0.set_yticks(range(len(names)), labels, fontsize=7)
    fig.colorbar(im, ax=ax0, label="MMD² / median off-diagonal, mean over sources")
    ax0.set_title(f"real-EM atlas ({len(per_source)} source encoders)")
    dendrogram(link, labels=labels, ax=ax1, orientation="right", leaf_font_size=7)
    r_s, p_s = result["mantel_species"]
    r_m, p_m = result["mantel_modality"]
    ax1.set_title(f"UPGMA; Mantel vs species r={r_s:.2f} (p={p_s:.3f}), vs modality r={r_m:.2f} (p={p_m:.3f})",
                  fontsize=8)
    fig.tight_layout()
    _atomic.save_figure(fig, Path(args.figure))
    print(json.dumps({k: result[k] for k in ("mantel_species", "mantel_modality", "nearest")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
