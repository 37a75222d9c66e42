"""Deprecated alias: :mod:`neuroadda_rt.study.synthetic` (the research harness moved out of the core)."""

import warnings

warnings.warn("neuroadda_rt.synthetic moved to neuroadda_rt.study.synthetic", DeprecationWarning, stacklevel=2)

from .study.synthetic import (  # noqa: E402
    ARTEFACT_KINDS, DomainStyle, FAMILY_TRAITS, FAMILY_TREES, MORPHOLOGY_TRAITS, PARAMETER_BOUNDS,
    apply_artefact, domain_family, make_domain)

__all__ = ['ARTEFACT_KINDS', 'DomainStyle', 'FAMILY_TRAITS', 'FAMILY_TREES', 'MORPHOLOGY_TRAITS', 'PARAMETER_BOUNDS', 'apply_artefact', 'domain_family', 'make_domain']
