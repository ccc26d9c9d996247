"""The smaller commands: verify, profile, inspect, targets, doctor, distill, report compare."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgepack.cli import render
from edgepack.cli.common import boundary, emit_json, err, out, parse_shapes


@boundary
def verify(
    bundle: Path = typer.Argument(..., help="Bundle directory or .tar.gz."),
    selftest: bool = typer.Option(True, "--selftest/--no-selftest", help="Run run.py --selftest too."),
    provider: Optional[str] = typer.Option(None, "--provider", help="Self-test on this provider/device instead of the bundle's (e.g. CPUExecutionProvider on a host without the GPU)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Check every file's hash and run the bundle's self-test; non-zero exit names the bad file."""
    from edgepack.api import verify as do_verify

    result = do_verify(bundle, selftest=selftest, provider=provider)
    if as_json:
        emit_json(result)
    else:
        out.print(f"ok: {bundle}: {result['files']} files match the manifest"
                  + (f"; self-test: {result['selftest'].get('line', 'passed')}" if selftest else ""), highlight=False)

@boundary
def profile(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, e.g. 1,4,16."),
    time_s: float = typer.Option(3.0, "--time", help="Seconds of timing per batch size."),
    warmup: int = typer.Option(10, "--warmup"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    provider: Optional[str] = typer.Option(None, "--provider", help="Override the provider/device."),
    json_out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the profile JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile JSON on stdout."),
):
    """Measure a bundle's latency on this host (same JSON schema as run.py --benchmark)."""
    from edgepack.api import profile as do_profile
    from edgepack.recipe import parse_batches

    batches = list(parse_batches(batch, "--batch"))
    result = do_profile(bundle, batches=batches, time_s=time_s, warmup=warmup, threads=threads,
                        provider=provider, out=json_out)
    if as_json:
        emit_json(result)
    else:
        render.render_profile(out, result)
        if json_out:
            out.print(f"profile: {json_out}")

@boundary
def inspect(
    model: str = typer.Argument(..., help="Model file (ONNX, IR .xml) or bundle directory."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Inputs, outputs, operator histogram, parameters and size of a model."""
    from edgepack.model.describe import inspect_model

    path = Path(model)
    if path.is_dir() and (path / "manifest.json").exists():
        from edgepack.bundle.manifest import load_manifest

        m = load_manifest(path)
        path = path / next(f for f in m["files"] if f.endswith((".onnx", ".xml")))
    info = inspect_model(path)
    emit_json(info) if as_json else render.render_inspect(out, info)

@boundary
def targets(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")):
    """List the target profiles, one line each."""
    if ctx.invoked_subcommand:
        return
    from edgepack.target import list_targets

    ts = list_targets()
    if as_json:
        emit_json([t.model_dump(mode="json") for t in ts])
    else:
        render.render_targets(out, ts)

@boundary
def targets_show(name: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")):
    """Print a profile with its resolved recipe (candidates and their steps)."""
    from edgepack.recipe import Recipe, plan
    from edgepack.target import load_target
    from edgepack.types import ModelFormat

    t = load_target(name)
    p = plan(t, Recipe(target=t.name), model_format=ModelFormat.ONNX, has_calib=True, has_train=False, has_eval=True)
    data = {"profile": t.model_dump(mode="json"), "plan": p.describe()}
    emit_json(data) if as_json else render.render_target(out, t, data["plan"])

@boundary
def doctor(as_json: bool = typer.Option(False, "--json")):
    """This host: CPU features, ONNX Runtime providers, OpenVINO devices, measurable targets."""
    from edgepack.api import doctor as do_doctor

    data = do_doctor()
    emit_json(data) if as_json else render.render_doctor(out, data)

@boundary
def distill(
    teacher: str = typer.Option(..., "--teacher", help="Teacher: file.py:build (with --teacher-weights), TorchScript or .pt2."),
    teacher_weights: Optional[Path] = typer.Option(None, "--teacher-weights"),
    student: Optional[str] = typer.Option(None, "--student", help="Student model (factory, TorchScript, .pt2)."),
    student_weights: Optional[Path] = typer.Option(None, "--student-weights"),
    student_width: Optional[float] = typer.Option(None, "--student-width", help="Derive a slimmer copy of the teacher."),
    train: Path = typer.Option(..., "--train"),
    eval_data: Path = typer.Option(..., "--eval"),
    out_dir: Path = typer.Option(Path("dist/student"), "--out", "-o"),
    temperature: float = typer.Option(4.0, "--temperature"),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the distillation loss (1-alpha on labels)."),
    epochs: int = typer.Option(30, "--epochs"),
    lr: float = typer.Option(1e-3, "--lr"),
    schedule: str = typer.Option("cosine", "--schedule"),
    warmup_epochs: int = typer.Option(0, "--warmup-epochs"),
    l1: float = typer.Option(0.0, "--l1"),
    l2: float = typer.Option(0.0, "--l2"),
    patience: Optional[int] = typer.Option(None, "--patience"),
    seed: int = typer.Option(0, "--seed"),
    input_shape: list[str] = typer.Option([], "--input-shape"),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Train a small student from a teacher (KL on softened logits + cross-entropy); writes a .pt2 and ONNX."""
    from edgepack.api import distill as do_distill
    from edgepack.cli.progress import Progress

    with Progress(err, enabled=not as_json) as progress:
        result = do_distill(teacher, teacher_weights=teacher_weights, student=student, student_weights=student_weights,
                            width=student_width, train=train, eval=eval_data, out=out_dir, temperature=temperature,
                            alpha=alpha, train_opts={"epochs": epochs, "lr": lr, "schedule": schedule,
                                                     "warmup_epochs": warmup_epochs, "l1": l1, "weight_decay": l2,
                                                     "patience": patience},
                            seed=seed, input_shapes=parse_shapes(input_shape), force=force, on_event=progress.event)
    emit_json(result) if as_json else render.render_distill(out, result)

@boundary
def compare(files: list[Path] = typer.Argument(..., help="report.json or profile JSON files."),
            out_dir: Path = typer.Option(Path("compare"), "--out", "-o")):
    """Put runs from several devices or candidates side by side (Markdown and HTML)."""
    from edgepack.report.compare import compare_reports

    paths = compare_reports(files, out_dir)
    for p in paths:
        out.print(str(p))
