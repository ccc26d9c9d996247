"""Knowledge distillation on load_digits, and the .pt2 round trip."""
from pathlib import Path

import pytest
import torch
from digits_util import dataset as _dataset
from digits_util import (
    one_thread,  # noqa: F401  (autouse: this module's tests run on one torch thread)
    trained_cnn,
)
from digits_util import params as _params

from edgepack.errors import ModelError, StepError
from edgepack.steps.distill import distill, save_torch_artifact
from edgepack.steps.train import TrainConfig, evaluate
from edgepack.types import Artifact, ModelFormat


@pytest.fixture(scope="module")
def teacher():
    return trained_cnn(metadata={"task": "digits"})


def test_slim_student_close_to_teacher(teacher):
    art, train, ev = teacher
    calls = []
    student, info = distill(art, width=0.45, train=train, eval=ev, cfg=TrainConfig(epochs=4, lr=3e-3),
                            seed=0, progress=lambda *a: calls.append(a))
    t, s = info["teacher"], info["student"]
    assert t["parameters"] == _params(art.module) == 38378
    assert s["parameters"] == _params(student.module) <= t["parameters"] / 4  # measured 7598 (0.198)
    assert t["accuracy"] > 0.97 and s["accuracy"] > t["accuracy"] - 0.03  # measured 0.995 vs ~0.985
    assert s["accuracy"] == evaluate(student.module, ev)
    assert info["accuracy_drop"] == pytest.approx(t["accuracy"] - s["accuracy"], abs=1e-4)
    assert "trained from the kept weights" in info["student_init"] and info["epochs_run"] == 4
    assert len(calls) == 4 and student.module[0].out_channels == 7  # 16 * 0.45 = 7.2 kept
    assert student.format is ModelFormat.TORCH and student.example_inputs is art.example_inputs
    assert student.metadata == {"task": "digits"} and art.module is not student.module


def test_given_student_from_scratch(teacher):
    art, train, ev = teacher
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    given = Artifact(path=Path("mlp.py"), format=ModelFormat.TORCH, module=mlp)
    student, info = distill(art, student=given, train=train, eval=ev, alpha=0.7, temperature=3.0,
                            cfg=TrainConfig(epochs=8, lr=1e-2), seed=0)
    assert info["student"]["parameters"] == 64 * 32 + 32 + 32 * 10 + 10 == 2410
    assert info["student"]["accuracy"] > 0.9  # a random-init MLP with 1/16 of the parameters
    assert info["student_init"].startswith("given student") and student.module is not mlp


def test_pure_soft_targets_need_no_labels(teacher):
    art, train, ev = teacher
    unlabelled = _dataset(train.inputs["x"][:300], None, "unlabelled")
    _, info = distill(art, width=0.5, train=unlabelled, eval=ev, alpha=1.0, cfg=TrainConfig(epochs=2), seed=0)
    assert info["student"]["accuracy"] > 0.8


def test_argument_errors(teacher):
    art, train, ev = teacher
    cfg = TrainConfig(epochs=1)
    with pytest.raises(StepError, match="exactly one of a student model or a width"):
        distill(art, train=train, eval=ev, cfg=cfg)
    with pytest.raises(StepError, match="width must be between 0 and 1, got 1.5"):
        distill(art, width=1.5, train=train, eval=ev, cfg=cfg)
    with pytest.raises(StepError, match="needs a PyTorch teacher, got onnx"):
        distill(Artifact(Path("m.onnx"), ModelFormat.ONNX), width=0.5, train=train, eval=ev, cfg=cfg)
    with pytest.raises(StepError, match="alpha must be in"):
        distill(art, width=0.5, train=train, eval=ev, cfg=cfg, alpha=2.0)


def test_pt2_round_trip(teacher, tmp_path):
    art, _, ev = teacher
    path = save_torch_artifact(art, tmp_path / "student")
    assert path == tmp_path / "student" / "model.pt2" and path.stat().st_size > 38378 * 4
    program = torch.export.load(str(path))
    loaded = program.module()
    art.module.eval()
    for n in (1, 5):  # the batch dimension stays dynamic
        x = torch.from_numpy(ev.inputs["x"][:n])
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), art.module(x), rtol=0, atol=0)
    with pytest.raises(ModelError, match="only a PyTorch model"):
        save_torch_artifact(Artifact(Path("m.onnx"), ModelFormat.ONNX), tmp_path)
