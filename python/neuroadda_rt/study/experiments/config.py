"""The study's configuration: defaults, validation, and the names the runner derives from it."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..._digest import json_sha256
from ...errors import FormatError, InputValueError, require
from ...selection import STRATEGIES
from ..synthetic import FAMILY_TRAITS, FAMILY_TREES

#: What a training section may set: the arguments of :func:`neuroadda_rt.finetune` (the run's
#: recipe) and of the source training.
_TRAIN_KEYS = {"steps", "lr", "batch_size", "patch_size", "augment"}

_DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "seed": 0,
    "tile_size": 256,
    "threads_per_task": 1,
    "domains": {
        "synthetic": None,   # {"n": 3, "family_seed": 0, "shape": [z, h, w], "drift": 0.6,
                             #  "tree": "coalescent", "traits": "morphology"}
        "datasets": [],      # manifest paths (examples/datasets/*.json) or {"manifest": ..., "name": ...}
        "data_root": None,   # where the manifests' relative paths point (default: $NEUROADDA_DATA)
    },
    "sources": {
        "zoo": None,         # reuse an existing zoo: {domain name: package path}, a zoo folder or "synthetic" ("default", its old name)
        "network": {"widths": [16, 32, 64, 128]},
        "train": {"steps": 2000, "lr": 1e-3, "batch_size": 8, "patch_size": 128},
    },
    "mmd": {"n_tiles": 128, "n_permutations": 200},
    "finetune": {
        "n": [1, 2, 4, 8, 16],
        "strategies": ["median", "random", "max", "kcenter", "median-diverse"],
        "seeds": [0, 1, 2],
        "pool": 512,
        "sources": "all",    # "all": every other domain's source; "best": only the top-ranked one
        "scratch": True,
        "targets": None,     # fine-tune only these target domains (default: every labelled domain)
        "train": {"steps": 300, "lr": 1e-3, "batch_size": 8, "patch_size": 128},
    },
    "evaluate": {"n_test": 16},
    "keep_models": False,
}


def _merge(base: dict, override: Mapping, path: str = "") -> dict:
    out = dict(base)
    for k, v in override.items():
        if k not in base:
            raise InputValueError(f"unknown configuration key {path + k!r}; expected one of "
                                  f"{sorted(path + key for key in base)}")
        if isinstance(base[k], dict) and isinstance(v, Mapping) and k not in ("zoo",):
            out[k] = _merge(base[k], v, path + k + ".")
        else:
            out[k] = v
    return out


@dataclass
class ExperimentConfig:
    """A validated study configuration (see ``examples/experiments/*.yaml``).

    ``raw`` holds the full configuration with defaults filled in; the attributes are the parts
    the runner reads often.
    """

    raw: dict
    source_path: str | None = None

    @property
    def name(self) -> str:
        return str(self.raw["name"])

    @property
    def tile_size(self) -> int:
        return int(self.raw["tile_size"])

    @property
    def ns(self) -> list[int]:
        return [int(n) for n in self.raw["finetune"]["n"]]

    @property
    def strategies(self) -> list[str]:
        return [str(s) for s in self.raw["finetune"]["strategies"]]

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.raw["finetune"]["seeds"]]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.raw, default=str))

    def digest(self, *keys: str) -> str:
        """Short digest of some top-level sections (what a stage's result depends on)."""
        part = {k: self.raw[k] for k in keys} if keys else self.raw
        return json_sha256(part)[:10]


def load_config(config, *, data_root=None) -> ExperimentConfig:
    """Read and validate a study configuration.

    Parameters
    ----------
    config : path to a YAML or JSON file, or a dict
        Unknown keys are refused (they are usually typos); missing keys take the defaults of the
        paper-sized study (see ``docs/method.md``).
    data_root : path, optional
        Overrides ``domains.data_root``: the folder the dataset manifests' relative paths point
        into (``--data-root`` on the command line). Without either, ``$NEUROADDA_DATA``.

    Returns
    -------
    ExperimentConfig

    Examples
    --------
    >>> cfg = load_config({"name": "tiny", "tile_size": 64,
    ...                    "domains": {"synthetic": {"n": 3, "family_seed": 0, "shape": [2, 128, 128]}},
    ...                    "finetune": {"n": [2, 4], "strategies": ["median"], "seeds": [0]}})
    >>> cfg.ns, cfg.strategies
    ([2, 4], ['median'])
    """
    source = None
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        if not p.exists():
            raise FileNotFoundError(f"experiment configuration not found: {p}")
        text = p.read_text(encoding="utf-8")
        source = str(p.resolve())
        if p.suffix.lower() in (".yaml", ".yml"):
            yaml = require("yaml", "test")
            try:
                config = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise FormatError(f"{p}: expected valid YAML, got: {exc}") from exc
        else:
            try:
                config = json.loads(text)
            except ValueError as exc:
                raise FormatError(f"{p}: expected valid JSON, got: {exc}") from exc
    if not isinstance(config, Mapping):
        raise InputValueError(f"expected a configuration mapping, got {type(config).__name__}")
    raw = _merge(_DEFAULTS, config)
    if data_root is not None:
        # a new dict: _merge shares the defaults' sub-dicts that the config does not override
        raw["domains"] = {**raw["domains"], "data_root": str(Path(data_root).expanduser())}
    cfg = ExperimentConfig(raw, source)
    _validate(cfg)
    return cfg


def _validate(cfg: ExperimentConfig) -> None:
    r = cfg.raw
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.name):
        raise InputValueError(f"expected a name of letters, digits, '_', '-', '.', got {cfg.name!r}")
    if cfg.tile_size < 16:
        raise InputValueError(f"expected tile_size >= 16, got {cfg.tile_size}")
    syn, ds = r["domains"]["synthetic"], r["domains"]["datasets"]
    if not syn and not ds:
        raise InputValueError("expected domains.synthetic and/or domains.datasets, got neither")
    if syn is not None:
        if not isinstance(syn, Mapping):
            raise InputValueError(f"expected domains.synthetic a mapping, got {type(syn).__name__}")
        unknown = set(syn) - {"n", "family_seed", "shape", "drift", "prefix", "tree", "traits"}
        if unknown:
            raise InputValueError(f"unknown keys in domains.synthetic: {sorted(unknown)}")
        for key, allowed in (("tree", FAMILY_TREES), ("traits", FAMILY_TRAITS)):
            if key in syn and syn[key] not in allowed:
                raise InputValueError(f"expected domains.synthetic.{key} in {allowed}, got {syn[key]!r}")
        if int(syn.get("n", 0)) < 2:
            raise InputValueError(f"expected domains.synthetic.n >= 2, got {syn.get('n')}")
    if not isinstance(ds, list):
        raise InputValueError(f"expected domains.datasets a list of manifest paths, got {type(ds).__name__}")
    if not cfg.ns or min(cfg.ns) < 1:
        raise InputValueError(f"expected finetune.n a non-empty list of positive integers, got {cfg.ns}")
    bad = [s for s in cfg.strategies if s not in STRATEGIES]
    if bad or not cfg.strategies:
        raise InputValueError(f"expected finetune.strategies among {STRATEGIES}, got {cfg.strategies}")
    if not cfg.seeds:
        raise InputValueError("expected at least one seed in finetune.seeds")
    ft_targets = r["finetune"]["targets"]
    if ft_targets is not None and (isinstance(ft_targets, str) or not all(isinstance(t, str) for t in ft_targets)):
        raise InputValueError(f"expected finetune.targets to be a list of domain names, got {ft_targets!r}")
    if r["finetune"]["sources"] not in ("all", "best"):
        raise InputValueError(f"expected finetune.sources 'all' or 'best', got {r['finetune']['sources']!r}")
    pool = int(r["finetune"]["pool"])
    if pool < max(cfg.ns):
        raise InputValueError(f"expected finetune.pool >= max(n) = {max(cfg.ns)}, got {pool}")
    if int(r["mmd"]["n_tiles"]) < 2:
        raise InputValueError(f"expected mmd.n_tiles >= 2, got {r['mmd']['n_tiles']}")
    train_settings(r["sources"]["train"])
    train_settings(r["finetune"]["train"])
    if int(r["evaluate"]["n_test"]) < 1:
        raise InputValueError(f"expected evaluate.n_test >= 1, got {r['evaluate']['n_test']}")


def safe_name(name: str) -> str:
    """``name`` as a file name (letters, digits, ``_.-``)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", str(name)).strip("-") or "x"


def train_settings(train: Mapping) -> dict:
    """A training section (``sources.train`` / ``finetune.train``), its keys checked."""
    unknown = set(train) - _TRAIN_KEYS
    if unknown:
        raise InputValueError(f"unknown training settings {sorted(unknown)}; expected some of {sorted(_TRAIN_KEYS)}")
    return dict(train)
