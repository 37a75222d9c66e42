"""The public API survives the layered-package move (issue 14).

``tests/assets/public_api.json`` was written from the flat package *before* the move: the top-level
names, every public name each module defined, and the CLI's commands. Each must still import. Old
module paths of the research harness (moved to :mod:`neuroadda_rt.study`) still import but warn.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest

import neuroadda_rt

API = json.loads((Path(__file__).parent / "assets" / "public_api.json").read_text())
MOVED_TO_STUDY = {"neuroadda_rt.synthetic", "neuroadda_rt.zoo_build", "neuroadda_rt.experiments"}


def _import(module: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(module)


@pytest.mark.parametrize("name", API["neuroadda_rt"])
def test_top_level_name_still_imports(name):
    assert name in neuroadda_rt.__all__
    value = getattr(neuroadda_rt, name)
    assert value is not None
    # A lazily resolved name is the object its defining module exports, not a copy.
    module = getattr(value, "__module__", None)
    if module and module.startswith("neuroadda_rt.") and hasattr(value, "__qualname__"):
        home = importlib.import_module(module)
        assert getattr(home, value.__qualname__.split(".")[0]) is value


@pytest.mark.parametrize(("module", "name"),
                         [(m, n) for m, names in API["modules"].items() for n in names])
def test_module_name_still_imports(module, name):
    mod = _import(module)
    assert hasattr(mod, name), f"{module}.{name} no longer imports"


@pytest.mark.parametrize("module", sorted(MOVED_TO_STUDY & set(API["modules"])))
def test_old_study_paths_warn_and_alias_the_new_home(module):
    new = importlib.import_module(module.replace("neuroadda_rt.", "neuroadda_rt.study."))
    import sys
    sys.modules.pop(module, None)
    with pytest.warns(DeprecationWarning, match="neuroadda_rt.study"):
        old = importlib.import_module(module)
    for name in API["modules"][module]:
        assert getattr(old, name) is getattr(new, name)


def test_cli_commands_unchanged():
    from neuroadda_rt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(API["cli_commands"]) <= set(sub.choices)


def test_version_has_one_source():
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("neuroadda_rt")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        pytest.skip("neuroadda_rt is not installed")
    assert neuroadda_rt.__version__ == installed == neuroadda_rt.build_info()["version"]
