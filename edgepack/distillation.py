"""`edgepack distill`: load teacher/student and data, train, save the student, compare the two."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.errors import EdgepackError, StepError


def _latency(artifact, out_dir: Path, threads: int) -> tuple[float | None, Path]:
    """Export to ONNX and time it on ONNX Runtime CPU (batch 1); the same yardstick for both models."""
    from edgepack.bench import measure
    from edgepack.data import synthetic_inputs
    from edgepack.model.describe import io_specs
    from edgepack.model.torch import export_onnx
    from edgepack.runtimes import open_session, reference_spec
    from edgepack.target import BenchSettings

    onnx_art = export_onnx(artifact, out_dir, opset=17)
    s = open_session(onnx_art, reference_spec(), threads=threads)
    specs, _ = io_specs(onnx_art)
    feeds = {k: v[:1] for k, v in synthetic_inputs(specs, 1, 0).items()}
    r = measure({"m": s}, feeds, BenchSettings(time_budget_s=1.0), batch=1)["m"]
    return r.p50, onnx_art.path


def run_distill(teacher: str, *, teacher_weights, student, student_weights, width, train, eval, out: Path,
                temperature: float, alpha: float, train_opts: dict[str, Any], seed: int, input_shapes,
                force: bool, emit: Callable[..., None]) -> dict:
    from edgepack.data import load_dataset
    from edgepack.host import physical_cores
    from edgepack.model.describe import io_specs
    from edgepack.model.load import load_model
    from edgepack.steps.distill import distill, save_torch_artifact
    from edgepack.steps.train import TrainConfig

    if out.exists() and not force:
        raise EdgepackError(f"{out} already exists", hint="pass --force or choose another --out")
    if out.exists() and not (out / "distill.json").exists():
        raise EdgepackError(f"{out} exists and is not a distillation output; --force only replaces those")
    t_art = load_model(teacher, weights=Path(teacher_weights) if teacher_weights else None, input_shapes=input_shapes)
    s_art = load_model(student, weights=Path(student_weights) if student_weights else None,
                       input_shapes=input_shapes) if student else None
    if (s_art is None) == (width is None):
        raise StepError("give a student (--student) or a width to derive one (--student-width 0.5), not both")
    ins, outs = io_specs(t_art)
    classes = outs[0].shape[1] if outs and len(outs[0].shape) == 2 and isinstance(outs[0].shape[1], int) else None
    train_ds = load_dataset(Path(train), ins, kind="train", require_labels=True, num_classes=classes)
    eval_ds = load_dataset(Path(eval), ins, kind="eval", require_labels=True, num_classes=classes)
    try:
        cfg = TrainConfig(**{k: v for k, v in train_opts.items() if v is not None})
    except Exception as e:
        raise StepError(f"invalid training options: {str(e).splitlines()[-1]}") from e

    def progress(epoch, total, loss, acc=None):
        emit("epoch", epoch=epoch, total=total, loss=loss, eval_acc=acc)

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        emit("phase", name="distilling")
        student_art, info = distill(t_art, student=s_art, width=width, train=train_ds, eval=eval_ds, cfg=cfg,
                                    temperature=temperature, alpha=alpha, seed=seed, progress=progress)
        pt2 = save_torch_artifact(student_art, tmp)
        threads = physical_cores()
        emit("phase", name="timing teacher and student")
        info["teacher"]["p50_ms"], _ = _latency(t_art, tmp / "teacher-onnx", threads)
        info["student"]["p50_ms"], onnx_path = _latency(student_art, tmp / "student-onnx", threads)
        shutil.move(str(onnx_path), tmp / "model.onnx")
        shutil.rmtree(tmp / "teacher-onnx", ignore_errors=True)
        shutil.rmtree(tmp / "student-onnx", ignore_errors=True)
        info["student_pt2"], info["student_onnx"] = str(out / pt2.name), str(out / "model.onnx")
        (tmp / "distill.json").write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
