"""Structured (channel) pruning with torch_pruning, then fine-tuning, on a tiny CNN and load_digits."""
import warnings

import pytest
import torch
from digits_util import cnn as _cnn
from digits_util import (
    one_thread,  # noqa: F401  (autouse: this module's tests run on one torch thread)
    trained_cnn,
)
from digits_util import params as _params

from edgepack.errors import StepError
from edgepack.steps import Context, get_step, make_config
from edgepack.steps.structured import structured_prune
from edgepack.steps.train import evaluate
from edgepack.target import RuntimeSpec, Target
from edgepack.types import Artifact, ModelFormat


def _ctx(tmp_path, **kw) -> Context:
    target = Target(name="t", description="test", precisions=("fp32",),
                    runtimes=(RuntimeSpec(runtime="onnxruntime", provider="CPUExecutionProvider"),))
    return Context(workdir=tmp_path / "work", target=target, **kw)


@pytest.fixture(scope="module")
def trained():
    return trained_cnn()


def test_halves_channels_and_fine_tuning_restores_accuracy(trained, tmp_path):
    art, train, ev = trained
    before = {k: v.clone() for k, v in art.module.state_dict().items()}
    messages = []
    ctx = _ctx(tmp_path, train=train, eval=ev, seed=3, progress=lambda m, f=None: messages.append((m, f)))
    cfg = make_config("structured-prune", {"ratio": 0.5, "epochs": 4, "lr": 1e-3})
    new, rec = structured_prune(art, cfg, ctx)
    m = new.module
    # hidden channels halved; the classifier keeps its 10 outputs
    assert (m[0].out_channels, m[1].num_features, m[3].in_channels, m[3].out_channels) == (8, 8, 8, 16)
    assert (m[8].in_features, m[8].out_features, m[10].in_features, m[10].out_features) == (256, 32, 32, 10)
    expected = (8 * 9 + 8) + 16 + (16 * 8 * 9 + 16) + 32 + (256 * 32 + 32) + (32 * 10 + 10)
    d = rec.details
    assert d["params_before"] == _params(art.module) == 38378
    assert d["params_after"] == _params(m) == expected == 9850
    assert 0.25 < d["flops_after"] / d["flops_before"] < 0.3  # conv2 costs 1/4, conv1 and fc 1/2
    # accuracy: high, hurt by pruning, restored by fine-tuning (measured 0.995 -> ~0.80 -> ~0.99)
    assert d["accuracy_before"] > 0.97
    assert d["accuracy_pruned"] < d["accuracy_before"] - 0.05
    assert d["accuracy_finetuned"] > d["accuracy_before"] - 0.02
    assert d["accuracy_finetuned"] == evaluate(m, ev)
    assert d["epochs_run"] == 4 and len(d["history"]) == 4
    assert new.format is ModelFormat.TORCH and new.example_inputs is art.example_inputs
    assert new.module(*art.example_inputs).shape == (1, 10)
    assert messages[-1] == (messages[-1][0], 1.0) and messages[-1][0].startswith("fine-tuning epoch 4/4")
    for k, v in art.module.state_dict().items():  # the input module is untouched
        assert torch.equal(v, before[k])
    assert "50% of channels" in rec.summary and rec.changed


def test_round_to_and_l2(trained, tmp_path):
    art, train, ev = trained
    cfg = make_config("structured-prune", {"ratio": 0.3, "importance": "l2", "round_to": 4, "epochs": 1})
    new, rec = structured_prune(art, cfg, _ctx(tmp_path, train=train, eval=ev))
    m = new.module
    for ch in (m[0].out_channels, m[3].out_channels, m[8].out_features):
        assert ch % 4 == 0
    # torch_pruning rounds the number of removed channels up to a multiple of 4: 4.8 -> 8, 9.6 -> 12, 19.2 -> 20
    assert (m[0].out_channels, m[3].out_channels, m[8].out_features) == (8, 20, 44)
    assert rec.details["params_after"] == _params(m)


def test_missing_training_data(trained, tmp_path):
    art, _, ev = trained
    cfg = make_config("structured-prune", {"ratio": 0.5})
    with pytest.raises(StepError) as e:
        structured_prune(art, cfg, _ctx(tmp_path, eval=ev))
    assert str(e.value) == "structured pruning fine-tunes on training data: pass --train train.npz"
    assert get_step("structured-prune").needs == ("torch", "train")


def test_needs_a_torch_module(trained, tmp_path):
    art, train, ev = trained
    cfg = make_config("structured-prune", {"ratio": 0.5})
    onnx_art = Artifact(path=tmp_path / "m.onnx", format=ModelFormat.ONNX)
    with pytest.raises(StepError, match="needs a PyTorch model .*factory \\+ weights.*TorchScript .* won't do"):
        structured_prune(onnx_art, cfg, _ctx(tmp_path, train=train))
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but users still have such files
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.script(_cnn())
    scripted = Artifact(path=tmp_path / "m.pt", format=ModelFormat.TORCH, module=module)
    with pytest.raises(StepError, match="TorchScript"):
        structured_prune(scripted, cfg, _ctx(tmp_path, train=train))


def test_config_is_flat_and_strict():
    cfg = make_config("structured-prune", {"ratio": 0.25, "epochs": 3, "schedule": "cosine", "l1": 1e-5})
    tc = cfg.train_config()
    assert (tc.epochs, tc.schedule, tc.l1, tc.lr, tc.batch_size) == (3, "cosine", 1e-5, 1e-3, 64)
    with pytest.raises(StepError, match="step 'structured-prune': epoch: unknown key"):
        make_config("structured-prune", {"ratio": 0.5, "epoch": 3})
    with pytest.raises(StepError, match="ratio"):
        make_config("structured-prune", {"ratio": 1.0})
