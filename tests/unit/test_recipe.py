"""Plans: candidates per runtime and precision, early failures before any work."""
from __future__ import annotations

import pytest

from edgepack.errors import StepError, TargetError
from edgepack.recipe import Recipe, StepSpec, load_recipe, plan, recipe_to_toml
from edgepack.target import load_target
from edgepack.types import ModelFormat


def _plan(target="cpu-x86", **kw):
    args = dict(model_format=ModelFormat.ONNX, has_calib=True, has_train=False, has_eval=True)
    args.update(kw.pop("args", {}))
    return plan(load_target(target), Recipe(target=target, **kw), **args)


def test_cpu_x86_candidates_from_both_runtimes():
    p = _plan()
    from edgepack.host import host_info

    bf16 = ["ov-cpu-bf16"] if {"avx512_bf16", "amx_bf16"} & set(host_info().features) else []
    names = [c.name for c in p.candidates]
    assert names == ["original", "ort-cpu-int8", "ort-cpu-int8-dynamic", "ort-cpu-int4", "ort-cpu-fp32",
                     "ov-cpu-int8", *bf16, "ov-cpu-int4", "ov-cpu-fp32"]
    assert p.candidates[0].original and p.candidates[0].steps == () and p.candidates[0].eligible
    assert ("ov-cpu-int8-dynamic", "openvino has no int8-dynamic path") in p.skipped
    assert ("ort-cpu-bf16", "onnxruntime has no bf16 path") in p.skipped
    assert [s.kind for s in p.candidates[names.index("ov-cpu-int8")].steps] == ["convert-ir", "nncf-int8"]


def test_no_calib_skips_static_int8_with_hint():
    p = _plan(args={"has_calib": False})
    assert "ort-cpu-int8" not in [c.name for c in p.candidates]
    assert any("--calib" in w for w in p.warnings)


def test_static_targets_fix_shapes_and_torch_exports():
    p = _plan("intel-npu", args={"model_format": ModelFormat.TORCH})
    assert [s.kind for s in p.shared] == ["export-onnx", "fix-shapes"]


def test_precision_not_offered():
    with pytest.raises(TargetError, match="not offered by target 'qualcomm-npu'"):
        _plan("qualcomm-npu", precisions=("fp16",))


def test_structured_pruning_needs_torch_and_train():
    steps = (StepSpec(kind="structured-prune", params={"ratio": 0.5}),)
    with pytest.raises(StepError, match="needs a PyTorch model"):
        _plan(steps=steps)
    with pytest.raises(StepError, match="--train"):
        _plan(steps=steps, args={"model_format": ModelFormat.TORCH})


def test_bad_step_params_fail_in_plan():
    with pytest.raises(StepError, match="prune"):
        _plan(steps=(StepSpec(kind="prune", params={"sparsity": 0.5, "bogus": 1}),))


def test_recipe_round_trip(tmp_path):
    r = Recipe(target="cpu-x86", precisions=("int8",), max_drop=0.02,
               steps=(StepSpec(kind="prune", params={"sparsity": 0.5}),), batch_sizes=(1, 4))
    f = tmp_path / "r.toml"
    f.write_text(recipe_to_toml(r))
    assert load_recipe(f) == r


def test_recipe_unknown_key(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('target = "cpu-x86"\nmax_dorp = 0.1\n')
    with pytest.raises(StepError, match="max_dorp: unknown key"):
        load_recipe(f)
