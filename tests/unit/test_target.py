"""Target profiles: shipped ones load, user files validate with the file and key named, extends works."""
from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepack.errors import TargetError
from edgepack.target import list_targets, load_target, target_names
from edgepack.types import Precision

NINE = {"cpu-x86", "cpu-arm64", "intel-cpu", "intel-gpu", "intel-npu", "nvidia-cuda", "nvidia-tensorrt",
        "qualcomm-npu", "apple-coreml"}


def test_nine_profiles_ship_and_validate():
    assert NINE <= set(target_names())
    for t in list_targets():
        assert len(t.description) > 80, t.name
        for r in t.runtimes:
            if r.runtime == "openvino":
                assert r.inference_precision in ("f32", "f16", "bf16")


def test_profile_specifics():
    assert load_target("intel-npu").shapes.policy == "static"
    assert load_target("qualcomm-npu").shapes.policy == "static"
    trt = load_target("nvidia-tensorrt")
    assert trt.quantization.symmetric_activations and trt.quantization.symmetric_weights
    assert trt.runtimes[0].provider_options["trt_engine_cache_path"] == "trt_cache"
    assert load_target("nvidia-cuda").precisions[0] is Precision.FP16
    x86 = load_target("cpu-x86")
    assert {r.runtime for r in x86.runtimes} == {"onnxruntime", "openvino"}
    assert load_target("intel-cpu").runtimes[0].inference_precision == "f32"


def test_unknown_target_lists_known():
    with pytest.raises(TargetError) as e:
        load_target("cpu-x87")
    assert "unknown target 'cpu-x87'" in str(e.value) and "cpu-x86" in str(e.value)


def test_user_file_unknown_key_names_file_and_key(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('extends = "cpu-x86"\ndescription = "mine"\n[quantization]\nactivation_tpye = "int8"\n')
    with pytest.raises(TargetError) as e:
        load_target(f)
    assert str(f) in str(e.value) and "quantization.activation_tpye" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('extends = "cpu-x86"\n[bench]\nwarmup = "ten"\n')
    with pytest.raises(TargetError, match=r"bench\.warmup"):
        load_target(f)


def test_extends_overrides_and_inherits(tmp_path):
    f = tmp_path / "a16.toml"
    f.write_text('extends = "qualcomm-npu"\ndescription = "QNN with 16-bit activations"\n'
                 '[quantization]\nactivation_type = "uint16"\n')
    t = load_target(f)
    assert t.name == "a16" and t.quantization.activation_type == "uint16"
    assert t.quantization.weight_type == "uint8" and t.shapes.policy == "static"
    assert t.runtimes[0].provider == "QNNExecutionProvider"


def test_extends_cycle(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\ndescription = "a"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\ndescription = "b"\n')
    with pytest.raises(TargetError, match="cycle"):
        load_target(tmp_path / "a.toml")


def test_broken_toml(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("name = [unclosed\n")
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target(f)


_keys = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)
_vals = st.one_of(st.integers(-5, 5), st.booleans(), st.text(string.printable, max_size=10), st.floats(allow_nan=False))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(_keys, st.one_of(_vals, st.dictionaries(_keys, _vals, max_size=3)), max_size=6))
def test_any_toml_either_loads_or_fails_cleanly(tmp_path, data):
    """Property: random profile content gives a Target or a TargetError, never another exception."""
    import tomli_w

    f = tmp_path / "random.toml"
    f.write_text(tomli_w.dumps(data))
    try:
        load_target(f)
    except TargetError as e:
        assert str(f) in str(e) or "unknown target" in str(e) or "target file" in str(e)
