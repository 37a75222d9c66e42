"""Build and runtime introspection."""

from __future__ import annotations

from . import _core


def build_info() -> dict:
    """Describe what this build of neuroadda_rt was compiled with.

    Returns
    -------
    dict
        ``version``, ``compiler``, ``simd_compiled`` (instruction sets the kernels were cloned
        for), ``simd_active`` (the clone the running CPU uses), ``openmp``, ``openmp_threads``,
        ``cuda`` (kernels compiled), ``cuda_version``, ``cuda_architectures``,
        ``cuda_devices`` (usable GPUs now) and ``cuda_device_names``.

    Examples
    --------
    >>> import neuroadda_rt
    >>> info = neuroadda_rt.build_info()
    >>> sorted(info)[:3]
    ['compiler', 'cuda', 'cuda_architectures']
    """
    n_dev = int(_core.cuda_device_count())
    return {
        "version": _core.__version__,
        "compiler": _core.compiler,
        "simd_compiled": list(_core.compiled_simd_levels()),
        "simd_active": _core.active_simd_level(),
        "openmp": bool(_core.built_with_openmp()),
        "openmp_threads": int(_core.openmp_max_threads()),
        "cuda": bool(_core.built_with_cuda()),
        "cuda_version": _core.cuda_version() or None,
        "cuda_architectures": _core.cuda_architectures().split(";") if _core.cuda_architectures() else [],
        "cuda_devices": n_dev,
        "cuda_device_names": [_core.cuda_device_name(i) for i in range(n_dev)],
    }
