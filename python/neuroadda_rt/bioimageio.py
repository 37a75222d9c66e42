"""Export a model package as a bioimage.io model (spec 0.5: ``rdf.yaml`` plus files, zipped).

The bioimage.io model zoo is how labs exchange models between deepImageJ (Fiji), ilastik,
napari and Python (``bioimageio.core``). :func:`export_bioimageio` writes a package that any of
them runs without neuroadda_rt:

* ``rdf.yaml`` (``format_version`` :data:`FORMAT_VERSION`), one input ``raw`` (batch, channel,
  [z,] y, x) and one output ``probabilities`` whose channels are named after the head
  (``boundary``, or ``affinity_z``/``affinity_y``/``affinity_x`` for the nearest-neighbour
  offsets of :func:`neuroadda_rt.labels.affinity_offsets`);
* weights: ``weights.pt`` (the PyTorch state dict; its architecture is
  ``neuroadda_rt.models.UNet`` with the package's config), ``weights.torchscript.pt``
  (traced from it) and the package's own ``model.onnx`` (BatchNorm folded; both name the state
  dict as their ``parent``, as the spec asks of converted weights);
* pre-processing that reproduces the package's intensity rule with the spec's own operations
  (:func:`preprocessing_for_rule`): ``scale_range`` per sample and channel for the percentile
  rule, ``scale_linear`` for the dtype and fixed rules, each followed by ``clip`` to [0, 1] as
  :func:`neuroadda_rt.io.normalize_intensity` clips;
* ``test_input.npy`` / ``test_output.npy``: a raw tile and neuroadda_rt's own
  :class:`~neuroadda_rt.Predictor` output for it, so that ``bioimageio.core``'s test-model check
  compares the package against this library;
* ``cover.png`` (the tile beside its prediction), ``README.md`` (documentation), authors,
  licence, citations and the training data description from the model card in ``model.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, _atomic
from ._sources import as_volume, load_package
from .errors import FormatError, InputValueError, ShapeError, require
from .io import intensity_rule
from .labels import affinity_offsets
from .package import ModelPackage
from .runtime import Predictor

__all__ = ["export_bioimageio", "preprocessing_for_rule", "spdx_license", "validate_bioimageio", "FORMAT_VERSION"]

#: The bioimage.io model description format written.
FORMAT_VERSION = "0.5.4"
#: Citation of the method every exported model implements (the model card may add more).
METHOD_CITATION = {"text": "Sawmya S, Athey TL, Liu G, Shavit N. NeuroADDA: Active Discriminative Domain "
                           "Adaptation in Connectomics. arXiv:2503.06196, 2025.",
                   "url": "https://arxiv.org/abs/2503.06196"}
#: Licence of the exported weights when the model card names none (bioimage.io's recommendation for models).
DEFAULT_LICENSE = "CC-BY-4.0"
_SPACE = ("z", "y", "x")


def _card(meta: dict[str, Any]) -> dict[str, Any]:
    """The model card: ``model.json``'s ``model_card`` (or ``card``, or ``extra.model_card``) over its ``training``
    record (where ``zoo build --from-datasets`` writes the card: data, dataset, licence and citation of the
    training data, recipe), else {}."""
    card: dict[str, Any] = {}
    for holder in (meta, meta.get("extra") or {}):
        for key in ("model_card", "card"):
            if isinstance(holder.get(key), dict):
                card = dict(holder[key])
                break
        if card:
            break
    return card


_SPDX = re.compile(r"^(CC-BY(-NC)?(-ND|-SA)?-[1-4]\.[05]|CC0-1\.0|CC-PDDC|MIT|MIT-0|BSD-[1234]-Clause|Apache-2\.0|"
                   r"ISC|Unlicense|MPL-2\.0|(A|L)?GPL-[23]\.0-(only|or-later)|LGPL-2\.1-(only|or-later)|ODbL-1\.0|"
                   r"ODC-By-1\.0|PDDL-1\.0)$")


def spdx_license(text) -> str | None:
    """The SPDX id a free-text licence names (``"CC BY-NC-SA 3.0"`` -> ``"CC-BY-NC-SA-3.0"``, ``"BSD-3-Clause
    (gala); see ..."`` -> ``"BSD-3-Clause"``), or None when it names none (e.g. "research use; see ...").

    Examples
    --------
    >>> spdx_license("CC BY-NC-SA 3.0"), spdx_license("research use only")
    ('CC-BY-NC-SA-3.0', None)
    """
    if not isinstance(text, str) or not text.strip():
        return None
    head = re.split(r"[;(,]| see ", text.strip(), maxsplit=1)[0].strip()
    cand = re.sub(r"[\s_]+", "-", head)
    cand = re.sub(r"(?i)^cc-?by", "CC-BY", cand)
    cand = re.sub(r"(?i)-(nc|nd|sa)(?=-)", lambda m: "-" + m.group(1).upper(), cand)
    return cand if _SPDX.match(cand) else None


def _first(*values, default=None):
    for v in values:
        if v not in (None, "", [], {}):
            return v
    return default


def preprocessing_for_rule(rule: str | dict, axes, dtype) -> list[dict[str, Any]]:
    """The bioimage.io pre-processing steps that reproduce an intensity rule.

    Parameters
    ----------
    rule : str or dict
        A :func:`neuroadda_rt.io.intensity_rule` (a package's ``normalization``).
    axes : sequence of str
        The spatial axis ids of the input (``["y", "x"]`` or ``["z", "y", "x"]``): a percentile
        rule is computed per sample and channel over them, as neuroadda_rt computes it per tile.
    dtype : numpy dtype
        The input tensor's declared dtype (the ``"dtype"`` rule's scale depends on it).

    Returns
    -------
    list of dict
        Steps in rdf.yaml form; the first and last are ``ensure_dtype: float32``.

    Examples
    --------
    >>> [s["id"] for s in preprocessing_for_rule("percentile", ["y", "x"], "float32")]
    ['ensure_dtype', 'scale_range', 'clip', 'ensure_dtype']
    >>> preprocessing_for_rule("dtype", ["y", "x"], "uint8")[1]["kwargs"]["gain"] == 1 / 255
    True
    """
    r = intensity_rule(rule)
    dt = np.dtype(dtype)
    f32 = {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}
    clip = {"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}}
    if r["rule"] == "percentile":
        steps = [{"id": "scale_range", "kwargs": {"axes": list(axes), "min_percentile": r["low"],
                                                  "max_percentile": r["high"], "eps": 1e-6}}]
    else:
        if r["rule"] == "fixed":
            lo, hi = r["low"], r["high"]
        elif dt.kind in "ui":
            info = np.iinfo(dt)
            lo, hi = float(info.min), float(info.max)
        elif dt.kind == "f":
            return [f32, clip, f32]  # floats are taken to be in [0, 1] already, and clipped
        else:
            raise InputValueError(f"expected a numeric input dtype, got {dt}")
        steps = [{"id": "scale_linear", "kwargs": {"gain": 1.0 / (hi - lo), "offset": -lo / (hi - lo)}}]
    return [f32, *steps, clip, f32]


# --------------------------------------------------------------------------------------------
# the test tile
# --------------------------------------------------------------------------------------------
def _membrane_tile(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A deterministic EM-like uint8 tile (bright cells, dark membranes between Voronoi cells,
    noise) for packages exported without a sample of real data."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    n_cells = max(4, int(np.prod(shape) / (24.0 ** len(shape))))
    seeds = rng.random((n_cells, len(shape))) * np.asarray(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, len(shape))
    d, _ = cKDTree(seeds).query(grid, k=2)
    gap = (d[:, 1] - d[:, 0]).reshape(shape)
    img = 170.0 - 110.0 * np.exp(-(gap / 1.5) ** 2) + rng.normal(0, 12, shape)
    img = ndimage.gaussian_filter(img, 0.8)
    return np.clip(img, 0, 255).astype(np.uint8)


def _sample_tile(sample, dim: int, size: tuple[int, ...]) -> np.ndarray:
    """The central ``size`` box of ``sample`` (middle slice for a 2-D model on a volume)."""
    vol = as_volume(sample, what="sample")
    shape = tuple(int(s) for s in vol.shape)
    if len(shape) < dim:
        raise ShapeError(f"expected a {dim}-D sample (or larger) for a {dim}-D model, got shape {shape}")
    lead = [s // 2 for s in shape[:len(shape) - dim]]
    spatial = shape[len(shape) - dim:]
    if any(s < t for s, t in zip(spatial, size)):
        raise ShapeError(f"expected a sample of at least {size} voxels, got spatial shape {spatial}; pass a "
                         f"smaller tile_size")
    starts = [(s - t) // 2 for s, t in zip(spatial, size)]
    box = tuple(lead) + tuple(slice(a, a + t) for a, t in zip(starts, size))
    tile = np.asarray(vol[box])
    if tile.dtype.kind not in "uif" or tile.dtype == bool:
        raise InputValueError(f"expected a numeric sample, got dtype {tile.dtype}")
    return np.ascontiguousarray(tile)


def _cover(tile: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """RGB uint8 cover, tile (grey) beside its prediction (magenta): 2:1, as bioimage.io asks."""
    img = tile[tile.shape[0] // 2] if tile.ndim == 3 else tile
    pr = probs[:, probs.shape[1] // 2] if probs.ndim == 4 else probs
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
    g = np.clip((img.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
    p = pr.mean(axis=0) if pr.shape[0] > 1 else pr[0]
    left = np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=-1)
    right = np.stack([p * 255, p * 40, p * 200], axis=-1).astype(np.uint8)
    return np.concatenate([left, right], axis=1)


# --------------------------------------------------------------------------------------------
# rdf
# --------------------------------------------------------------------------------------------
def _authors(card: dict, meta: dict) -> list[dict]:
    raw = _first(card.get("authors"), (meta.get("extra") or {}).get("authors"),
                 default=[{"name": "neuroadda_rt developers"}])
    out = []
    for a in raw if isinstance(raw, list) else [raw]:
        if isinstance(a, str):
            out.append({"name": a})
        elif isinstance(a, dict) and a.get("name"):
            out.append({k: str(v) for k, v in a.items() if k in ("name", "affiliation", "email", "github_user",
                                                                     "orcid")})
    return out or [{"name": "neuroadda_rt developers"}]


def _cite(card: dict, training: dict) -> list[dict]:
    out = [dict(METHOD_CITATION)]
    for entry in (card.get("cite"), card.get("citation"), training.get("citation"),
                  (card.get("training_data") or {}).get("citation") if isinstance(card.get("training_data"), dict)
                  else None):
        for c in entry if isinstance(entry, list) else [entry]:
            if isinstance(c, str) and c.strip():
                # the spec needs a DOI or URL per entry; a citation without one stays in the training data's
                # description (never given someone else's link)
                doi = re.search(r"10\.\d{4,9}/[^\s;,]+", c)
                url = re.search(r"https?://\S+", c)
                if doi:
                    out.append({"text": c.strip(), "doi": doi.group(0).rstrip(".")})
                elif url:
                    out.append({"text": c.strip(), "url": url.group(0).rstrip(".,;")})
            elif isinstance(c, dict) and c.get("text") and (c.get("doi") or c.get("url")):
                out.append({k: str(v) for k, v in c.items() if k in ("text", "doi", "url")})
    seen, uniq = set(), []
    for c in out:
        if c["text"] not in seen:
            seen.add(c["text"])
            uniq.append(c)
    return uniq


def _training_data(pkg: ModelPackage, card: dict, authors: list[dict], cite: list[dict], license_: str) -> dict:
    """An inline bioimage.io dataset description of the training data (name, description, licence)."""
    tr = pkg.training
    td = card.get("training_data") if isinstance(card.get("training_data"), dict) else {}
    ds = tr.get("dataset") if isinstance(tr.get("dataset"), dict) else {}
    text = _first(td.get("description"), tr.get("data"), default="not recorded in the model package")
    extra = {k: v for k, v in tr.items() if k not in ("data", "license", "citation") and isinstance(v, (str, int, float))}
    terms = _first(td.get("license"), tr.get("license"))
    desc = " ".join(x for x in (
        f"{text}.", str(ds.get("description") or ""),
        f"Licence/terms of the data: {terms}." if terms else "",
        f"Cite: {tr['citation']}." if isinstance(tr.get("citation"), str) and tr["citation"].strip() else "",
        f"({', '.join(f'{k}: {v}' for k, v in sorted(extra.items()))})" if extra else "") if x)
    out = {"type": "dataset", "format_version": "0.3.0",
           "name": str(_first(td.get("name"), ds.get("name"), f"training data of {pkg.name}"))[:128],
           "description": desc[:1024], "authors": authors, "cite": cite,
           "tags": [t for t in (pkg.modality, pkg.organism, pkg.tissue) if t]}
    lic = spdx_license(terms) if terms else license_
    if lic:  # free-text terms (e.g. "research use; see ...") are no SPDX id: they stay in the description
        out["license"] = lic
    return out


def _dump_yaml(obj) -> str:
    try:
        import yaml
    except ImportError:  # JSON is YAML 1.2: a reader of rdf.yaml reads it just the same
        return json.dumps(obj, indent=2)
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=110)


def _sha(path: Path) -> str:
    from ._digest import file_sha256

    return file_sha256(path)


def _torch_version(torch) -> str:
    return torch.__version__.split("+")[0]


def export_bioimageio(model, out, *, sample=None, tile_size: int | None = None, name: str | None = None,
                      description: str | None = None, authors=None, license: str | None = None,
                      weights=("pytorch_state_dict", "torchscript", "onnx"), backend: str = "onnxruntime",
                      validate: bool | str = "auto", overwrite: bool = False) -> Path:
    """Write a model package as a bioimage.io model (format 0.5; a ``.zip`` or a folder).

    Parameters
    ----------
    model : ModelPackage or path
        The model package.
    out : path
        ``*.zip``: the zipped package (what the zoo, deepImageJ and ``bioimageio.core`` load);
        any other path: a folder holding ``rdf.yaml`` and its files. Written atomically.
    sample : path, array or Volume, optional
        Real data to cut the test tile from (its centre; the middle slice for a 2-D model on a
        volume), in the intensities the model is meant for. Without it a deterministic EM-like
        uint8 tile is drawn (Voronoi cells with dark membranes), and the rdf says so.
    tile_size : int, optional
        Edge of the test tile (default 256 in 2-D, 64 in 3-D); rounded up to a multiple of the
        network's ``2**(depth-1)``.
    name, description : str, optional
        Default: the model card's (``model.json``), else the package name and a generated text.
    authors : list of str or dict, optional
        Default: the model card's ``authors``, else "neuroadda_rt developers".
    license : str, optional
        SPDX id; default the model card's ``license``, else ``CC-BY-4.0``.
    weights : sequence of str
        Weight formats to include, from ``"pytorch_state_dict"`` (always, as the parent of the
        others), ``"torchscript"`` and ``"onnx"``.
    backend : str
        Runtime backend computing the test output (default ONNX Runtime, the package's path).
    validate : bool or "auto"
        Validate the written description with ``bioimageio.spec`` (``"auto"``: when it is
        installed); an invalid one raises :class:`~neuroadda_rt.errors.FormatError` and nothing
        is left at ``out``.
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    pathlib.Path
        ``out``.

    Examples
    --------
    >>> import neuroadda_rt                                                          # doctest: +SKIP
    >>> neuroadda_rt.export_bioimageio("tests/assets/tiny_model", "tiny.bioimageio.zip")  # doctest: +SKIP
    """
    torch = require("torch", "torch")
    pkg = load_package(model)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    kinds = tuple(weights)
    bad = [w for w in kinds if w not in ("pytorch_state_dict", "torchscript", "onnx")]
    if bad:
        raise InputValueError(f"expected weight formats among pytorch_state_dict, torchscript, onnx, got {bad}")
    meta, cfg = pkg.metadata, pkg.config
    card = _card(meta)
    dim = int(cfg["dim"])
    net = pkg.unet()
    m = int(net.multiple)
    edge = int(tile_size or (256 if dim == 2 else 64))
    if edge < m:
        raise InputValueError(f"expected tile_size >= {m} (2**(depth-1) of this network), got {edge}")
    edge = -(-edge // m) * m
    size = (edge,) * dim
    synthetic = sample is None
    tile = _membrane_tile(size) if synthetic else _sample_tile(sample, dim, size)
    rule = intensity_rule(pkg.normalization)
    in_dtype = tile.dtype if rule["rule"] == "dtype" else np.dtype(np.float32)
    if in_dtype.name not in ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float32", "float64"):
        tile, in_dtype = tile.astype(np.float32), np.dtype(np.float32)
    test_in = tile.astype(in_dtype)[None, None]
    pred = Predictor(pkg, backend=backend, device="cpu", tile=edge)
    test_out = np.ascontiguousarray(pred.predict_tiles(test_in[:, 0]), dtype=np.float32)
    if test_out.ndim == dim + 1:
        test_out = test_out[:, None]
    axes_sp = list(_SPACE[3 - dim:])
    vs = pkg.voxel_size_nm
    vs = list(vs)[-dim:] if vs and len(vs) >= dim else None
    heads = {"boundary": ["boundary"],
             "affinities": [f"affinity_{_SPACE[3 - dim + k]}" for k in range(dim)]}
    channels = heads.get(pkg.representation) or [f"channel_{k}" for k in range(test_out.shape[1])]
    if len(channels) != test_out.shape[1]:
        raise FormatError(f"{pkg.path}: expected {len(channels)} output channels for a {pkg.representation} head, "
                          f"got {test_out.shape[1]}")
    authors_ = _authors({"authors": authors} if authors else card, meta)
    # the weights' licence: given, else the card's, else the training data's when it is an SPDX id (weights
    # derived from data keep its terms), else a LICENSE.md quoting non-SPDX data terms, else DEFAULT_LICENSE
    data_terms = pkg.training.get("license")
    license_: Any = _first(license, card.get("license"), (meta.get("extra") or {}).get("license"),
                           spdx_license(data_terms))
    license_file = None
    if license_ is None and isinstance(data_terms, str) and data_terms.strip():
        license_file = (f"# Licence of these weights\n\nThe weights were trained on data under these terms, which "
                        f"therefore apply to them too:\n\n> {data_terms.strip()}\n")
        license_ = {"source": "LICENSE.md"}
    if license_ is None:
        license_ = DEFAULT_LICENSE
    cite = _cite(card, pkg.training)
    name_ = str(_first(name, card.get("name"), pkg.name))[:128]
    if len(name_) < 5:  # the spec asks for 5 to 128 characters
        name_ = f"neuroadda_rt {name_}"
    out_desc = ("sigmoid probability that the pixel lies on a cell boundary (membrane)"
                if pkg.representation == "boundary" else
                "sigmoid nearest-neighbour affinities: channel " + ", ".join(
                    f"{c} = P(voxel and its neighbour at offset {tuple(o)} belong to one cell)"
                    for c, o in zip(channels, affinity_offsets(dim))))
    where = ("a deterministic EM-like test tile (Voronoi cells with dark membranes; no real sample was given)"
             if synthetic else "the centre of the sample given at export")
    desc = str(_first(description, card.get("description"), default=(
        f"{dim}-D UNet ({pkg.representation} head) for neuron segmentation in electron microscopy "
        f"({pkg.modality or 'EM'}, {pkg.organism or 'unknown organism'}, {pkg.tissue or 'unknown tissue'}), "
        f"exported from neuroadda_rt {__version__}. Test tensors: {where}.")))

    def space_axes(kind: str):
        axes = []
        for k, a in enumerate(axes_sp):
            ax: dict[str, Any] = {"type": "space", "id": a}
            if kind == "in":
                ax["size"] = {"min": m, "step": m}
            else:
                ax["size"] = {"tensor_id": "raw", "axis_id": a}
            if vs:
                ax["unit"], ax["scale"] = "nanometer", float(vs[k])
            axes.append(ax)
        return axes

    rdf: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "type": "model", "name": name_, "description": desc[:1024],
        "authors": authors_, "cite": cite, "license": license_,
        "tags": [t for t in ("electron-microscopy", "connectomics", "neuron-segmentation", "unet", f"{dim}d",
                             "pytorch", pkg.representation, pkg.modality, pkg.organism, pkg.tissue) if t],
        "documentation": "README.md", "covers": ["cover.png"],
        "git_repo": card.get("git_repo") if str(card.get("git_repo", "")).startswith("http") else None,
        "version": str(card.get("version") or "0.1.0"),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "inputs": [{
            "id": "raw", "description": f"raw EM intensities ({'; '.join(axes_sp)} spatial axes)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]}, *space_axes("in")],
            "test_tensor": {"source": "test_input.npy"}, "sample_tensor": {"source": "sample_input.tif"},
            "data": {"type": in_dtype.name},
            "preprocessing": preprocessing_for_rule(rule, axes_sp, in_dtype),
        }],
        "outputs": [{
            "id": "probabilities", "description": (out_desc if pkg.representation == "boundary" else
                                                    "sigmoid affinity of each voxel to its previous neighbour along "
                                                    + "/".join(axes_sp) + " (one channel per axis)")[:128],
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": channels}, *space_axes("out")],
            "test_tensor": {"source": "test_output.npy"}, "sample_tensor": {"source": "sample_output.tif"},
            "data": {"type": "float32", "range": [0.0, 1.0]},
        }],
        "training_data": _training_data(pkg, card, authors_, cite, license_),
        "config": {"bioimageio": {
            "reproducibility_tolerance": [{"absolute_tolerance": 1e-4, "relative_tolerance": 1e-4,
                                           "mismatched_elements_per_million": 0}],
            "architecture_type": "UNet", "modality": pkg.modality, "task": f"{pkg.representation} prediction"},
            "neuroadda_rt": {"version": __version__, "package_sha256": pkg.sha256, "normalization": rule,
                             "network": cfg, "representation": pkg.representation, "voxel_size_nm": pkg.voxel_size_nm,
                             "metrics": pkg.metrics, "output_description": out_desc}},
    }
    if rdf["git_repo"] is None:
        del rdf["git_repo"]
    if not rdf["config"]["bioimageio"]["modality"]:
        del rdf["config"]["bioimageio"]["modality"]

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        np.save(work / "test_input.npy", test_in, allow_pickle=False)
        np.save(work / "test_output.npy", test_out, allow_pickle=False)
        tifffile = require("tifffile", "io")
        tifffile.imwrite(work / "sample_input.tif", test_in[0, 0], photometric="minisblack")
        tifffile.imwrite(work / "sample_output.tif", test_out[0], photometric="minisblack")
        Image = require("PIL.Image", "io")
        Image.fromarray(_cover(test_in[0, 0], test_out[0])).save(work / "cover.png")
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        torch.save(state, work / "weights.pt")
        tv = _torch_version(torch)
        w: dict[str, Any] = {"pytorch_state_dict": {
            "source": "weights.pt", "sha256": _sha(work / "weights.pt"), "pytorch_version": tv,
            "architecture": {"callable": "UNet", "import_from": "neuroadda_rt.models", "kwargs": cfg},
            "comment": "needs the neuroadda_rt package (pip install neuroadda_rt[torch])"}}
        if "torchscript" in kinds:
            import warnings

            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TracerWarnings: the padding arithmetic is traced on purpose
                ts = torch.jit.trace(net.eval(), torch.from_numpy(np.zeros((1, int(cfg["in_channels"]), *size),
                                                                           np.float32)))
            ts.save(str(work / "weights.torchscript.pt"))
            w["torchscript"] = {"source": "weights.torchscript.pt", "sha256": _sha(work / "weights.torchscript.pt"),
                                "pytorch_version": tv, "parent": "pytorch_state_dict"}
        if "onnx" in kinds:
            shutil.copyfile(pkg.model_onnx, work / "model.onnx")
            w["onnx"] = {"source": "model.onnx", "sha256": _sha(work / "model.onnx"),
                         "opset_version": int((meta.get("onnx") or {}).get("opset", 18)),
                         "parent": "pytorch_state_dict",
                         "comment": "the package's model.onnx: BatchNorm folded, padding to a multiple inside the graph"}
        rdf["weights"] = w
        for t in (rdf["inputs"][0], rdf["outputs"][0]):
            for k in ("test_tensor", "sample_tensor"):
                t[k]["sha256"] = _sha(work / t[k]["source"])
        rdf["covers"] = ["cover.png"]
        (work / "README.md").write_text(_readme(pkg, rdf, where), encoding="utf-8")
        if license_file is not None:
            (work / "LICENSE.md").write_text(license_file, encoding="utf-8")
            rdf["license"]["sha256"] = _sha(work / "LICENSE.md")
        (work / "rdf.yaml").write_text(_dump_yaml(rdf), encoding="utf-8")
        if validate == "auto":
            try:
                import bioimageio.spec  # noqa: F401
                validate = True
            except ImportError:
                validate = False
        if validate:
            summary = validate_bioimageio(work / "rdf.yaml")
            if summary["status"] != "valid-format" and summary["status"] != "passed":
                raise FormatError(f"the exported bioimage.io description does not validate: {summary['errors']}")
        if out.suffix.lower() == ".zip":
            with _atomic.atomic_path(out) as tmp:
                with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                    for f in sorted(work.iterdir()):
                        zf.write(f, f.name)
        else:
            _atomic.commit_dir(work, out, overwrite=overwrite)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def validate_bioimageio(source) -> dict[str, Any]:
    """Validate a bioimage.io description (``rdf.yaml``, its folder or a zip) with ``bioimageio.spec``.

    Returns ``{"status": ..., "errors": [...], "warnings": [...]}``; needs the ``bioimageio`` extra.
    Only the format is checked (no network, no weights run); ``bioimageio.core``'s
    ``test_model`` runs the weights.
    """
    require("bioimageio.spec", "bioimageio")
    from bioimageio.spec import ValidationContext, load_description

    with ValidationContext(perform_io_checks=True):
        descr = load_description(str(source), format_version="discover")
    summary = descr.validation_summary
    errors = [f"{'.'.join(str(x) for x in e.loc)}: {e.msg}" for d in summary.details for e in d.errors]
    warnings = [f"{'.'.join(str(x) for x in e.loc)}: {e.msg}" for d in summary.details for e in d.warnings]
    return {"status": str(summary.status), "errors": errors, "warnings": warnings, "description": descr}


def _readme(pkg: ModelPackage, rdf: dict, where: str) -> str:
    pre = ", ".join(s["id"] for s in rdf["inputs"][0]["preprocessing"])
    vi = {k: v for k, v in pkg.metrics.items() if isinstance(v, (int, float))}
    lines = [
        f"# {rdf['name']}", "", rdf["description"], "",
        "## Input and output", "",
        f"- input `raw`: axes {', '.join(a.get('id', a['type']) for a in rdf['inputs'][0]['axes'])}; "
        f"spatial sizes multiples of {rdf['inputs'][0]['axes'][2]['size']['step']}; declared dtype "
        f"{rdf['inputs'][0]['data']['type']}.",
        f"- pre-processing ({pre}) reproduces neuroadda_rt's intensity rule "
        f"`{json.dumps(rdf['config']['neuroadda_rt']['normalization'])}`.",
        f"- output `probabilities`: {rdf['config']['neuroadda_rt']['output_description']}.",
        "", "## Training data", "", rdf["training_data"]["description"], "",
        "## Validation metrics", "",
        ("\n".join(f"- {k}: {v}" for k, v in sorted(vi.items())) or "none recorded in the model package"), "",
        "## Use", "",
        "Run in deepImageJ (Fiji), ilastik or napari (bioimageio plugins), or in Python with "
        "`bioimageio.core`. The `pytorch_state_dict` weights need the `neuroadda_rt` package; the TorchScript "
        "and ONNX weights need nothing else.", "",
        f"Test tensors: {where}; the test output is neuroadda_rt's own `Predictor` on the test input.",
    ]
    return "\n".join(lines) + "\n"
