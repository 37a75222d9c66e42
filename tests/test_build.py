
import pytest

import neuroadda_rt
from neuroadda_rt._device import resolve_device


def test_build_info_reports_compiled_features():
    info = neuroadda_rt.build_info()
    assert info["version"] == neuroadda_rt.__version__
    assert "default" in info["simd_compiled"]
    assert info["simd_active"] in info["simd_compiled"]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_architectures"], "a CUDA build must report its architectures"
    else:
        assert info["cuda_architectures"] == [] and info["cuda_version"] is None
    assert info["cuda_devices"] == len(info["cuda_device_names"])


def test_cuda_available_matches_build_and_devices():
    info = neuroadda_rt.build_info()
    assert neuroadda_rt.cuda_available() == (info["cuda"] and info["cuda_devices"] > 0)


def test_resolve_device_rules():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("AUTO") == ("cuda" if neuroadda_rt.cuda_available() else "cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    if not neuroadda_rt.cuda_available():
        with pytest.raises(RuntimeError, match="device='cuda' requested but"):
            resolve_device("cuda")


def test_import_needs_only_numpy():
    import subprocess
    import sys

    code = ("import sys, neuroadda_rt; heavy = {'torch', 'onnxruntime', 'dask', 'tensorrt', 'h5py', 'zarr'};"
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_attribute_is_attribute_error():
    with pytest.raises(AttributeError):
        neuroadda_rt.no_such_thing  # noqa: B018
