"""Deprecated alias: :mod:`neuroadda_rt.study.zoo_build` (the research harness moved out of the core)."""

import warnings

warnings.warn("neuroadda_rt.zoo_build moved to neuroadda_rt.study.zoo_build", DeprecationWarning, stacklevel=2)

from .study.zoo_build import (  # noqa: E402
    DEFAULT_ZOO, FAMILY_FORMAT, IMAGE_EVIDENCE_SEEDS, ZooRecipe, build_zoo, choose_family_seed,
    family_clarity, family_generator, family_image_evidence, family_spec, image_statistics,
    legacy_recipe, patristic_table, refresh_reference_features, zoo_size_bytes)

__all__ = ['DEFAULT_ZOO', 'FAMILY_FORMAT', 'IMAGE_EVIDENCE_SEEDS', 'ZooRecipe', 'build_zoo', 'choose_family_seed', 'family_clarity', 'family_generator', 'family_image_evidence', 'family_spec', 'image_statistics', 'legacy_recipe', 'patristic_table', 'refresh_reference_features', 'zoo_size_bytes']
