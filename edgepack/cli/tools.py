"""The smaller commands: verify, profile, inspect, targets, doctor, distill, report compare."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgepack.cli import render
from edgepack.cli.common import boundary, emit_json, err, out, parse_shapes, quiet_torch


@boundary
def verify(
    bundle: Path = typer.Argument(..., help="Bundle directory or .tar.gz."),
    selftest: bool = typer.Option(True, "--selftest/--no-selftest", help="Run run.py --selftest too."),
    provider: Optional[str] = typer.Option(None, "--provider", show_default="the bundle's", help="Self-test on this provider/device instead of the bundle's (e.g. CPUExecutionProvider on a host without the GPU)."),
    trusted_key: Optional[Path] = typer.Option(None, "--trusted-key", show_default="signature not checked", help="Ed25519 public key (PEM or OpenSSH) the bundle's signature.json must verify against."),
    allow_custom_runner: bool = typer.Option(False, "--allow-custom-runner", help="Accept a run.py that differs from edgepack's runner (the self-test runs edgepack's own either way)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Check every file's hash and run the bundle's self-test; non-zero exit names the bad file."""
    from edgepack.api import verify as do_verify
    from edgepack.cli.common import plain

    result = do_verify(bundle, selftest=selftest, provider=provider, trusted_key=trusted_key,
                       allow_custom_runner=allow_custom_runner)
    if as_json:
        emit_json(result)
        return
    sig = result.get("signature")
    signed = (f"; signed by trusted key {sig['key_id']}" if sig and sig.get("trusted") else
              "; signature.json present but not checked (pass --trusted-key)" if sig else "")
    custom = "" if result.get("runner", "").startswith("run.py is edgepack") else f"; accepted {result['runner']}"
    out.print(plain(f"ok: {bundle}: {result['files']} files match the manifest{signed}{custom}"
                    + (f"; self-test: {result['selftest'].get('line', 'passed')}" if selftest else "")),
              markup=False, highlight=False)

@boundary
def profile(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, e.g. 1,4,16."),
    time_s: float = typer.Option(3.0, "--time", help="Seconds of timing per batch size."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed runs before timing."),
    threads: Optional[int] = typer.Option(None, "--threads", show_default="the bundle's settings", help="Intra-op threads."),
    provider: Optional[str] = typer.Option(None, "--provider", show_default="the bundle's", help="Run on this ONNX Runtime provider or OpenVINO device instead."),
    json_out: Optional[Path] = typer.Option(None, "--out", "-o", show_default="not written", help="Write the profile JSON here."),
    on: list[str] = typer.Option([], "--on", help="Profile on this device over SSH instead (repeatable; in parallel; writes profiles/<device>.json)."),
    devices_file: Optional[Path] = typer.Option(None, "--devices", help="Devices file (default: the user config directory's devices.toml)."),
    keep: bool = typer.Option(False, "--keep", help="With --on: keep the copied bundle on the device."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile JSON on stdout."),
):
    """Measure a bundle's latency on this host, or on devices over SSH (same JSON schema as run.py --benchmark)."""
    from edgepack.api import profile as do_profile
    from edgepack.recipe import parse_batches

    batches = list(parse_batches(batch, "--batch"))
    if on:
        _profile_on(bundle, on, devices_file, keep, time_s, warmup, threads, batches, as_json)
        return
    result = do_profile(bundle, batches=batches, time_s=time_s, warmup=warmup, threads=threads,
                        provider=provider, out=json_out)
    if as_json:
        emit_json(result)
    else:
        render.render_profile(out, result)
        if json_out:
            out.print(f"profile: {json_out}")

def _profile_on(bundle: Path, on: list[str], devices_file, keep: bool, time_s: float, warmup: int, threads,
                batches: list[int], as_json: bool) -> None:
    """profile --on a --on b: every device at once; exit 0 all ok, 1 none, 5 some (partial)."""
    from edgepack.cli.common import err
    from edgepack.devices import fleet_exit_code, profile_on

    results = profile_on(bundle, list(on), devices_file, keep=keep, time_s=time_s, warmup=warmup, threads=threads,
                         batch=batches[0], progress=not as_json, console=err)
    if as_json:
        emit_json({"profiles": {d: r for d, r in results.items() if isinstance(r, dict)},
                   "errors": {d: str(r) for d, r in results.items() if not isinstance(r, dict)}})
    else:
        for d, r in results.items():
            if isinstance(r, dict):
                lat = r["latency"]
                out.print(f"{d}: p50 {lat['p50']:.4f} ms, p90 {lat['p90']:.4f} ms on {r.get('device_used')} "
                          f"({(r.get('device') or {}).get('cpu', '?')}) -> {bundle / 'profiles' / (d + '.json')}",
                          highlight=False)
            else:
                out.print(f"{d}: failed: {r}", highlight=False)
    code = fleet_exit_code(results)
    if code:
        raise typer.Exit(code)


@boundary
def inspect(
    model: str = typer.Argument(..., help="Model file (ONNX, IR .xml) or bundle directory."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Inputs, outputs, operator histogram, parameters and size of a model (a file.py is read, never run)."""
    from edgepack.model.describe import inspect_model
    from edgepack.model.load import describe_python, factory_spec

    factory = factory_spec(model)
    if factory:  # Python source: described from its text; importing it would run it
        info = describe_python(*factory)
        emit_json(info) if as_json else _render_python(info)
        return
    path = Path(model)
    if path.is_dir() and (path / "manifest.json").exists():
        from edgepack.bundle.manifest import load_manifest
        from edgepack.errors import BundleError

        m = load_manifest(path)
        rt_model = m["runtime"].get("model")
        if not isinstance(rt_model, str) or rt_model not in m["files"] or "/" in rt_model:
            raise BundleError(f"{path / 'manifest.json'} names no model file of the bundle")
        path = path / rt_model
    info = inspect_model(path)
    emit_json(info) if as_json else render.render_inspect(out, _markup_safe(info))


def _markup_safe(value):
    """Strings from a model file (paths, tensor names, metadata) as literal text for rich markup lines."""
    from rich.markup import escape

    from edgepack.cli.common import plain

    if isinstance(value, str):
        return escape(plain(value))
    if isinstance(value, dict):
        return {_markup_safe(k): _markup_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_markup_safe(v) for v in value)
    return value


def _render_python(info: dict) -> None:
    from edgepack.cli.common import plain

    lines = [f"{info['path']} format python (source, not imported: inspect runs no code) size "
             f"{info['size_bytes']:,} bytes, sha256 {info['sha256'][:16]}",
             f"  function {info['function']}: " + ("defined" if info["defined"] else "NOT defined in the file"),
             "  functions: " + (", ".join(info["functions"]) or "none"),
             "  classes: " + (", ".join(info["classes"]) or "none"),
             "  imports: " + (", ".join(info["imports"]) or "none"),
             f"  {info['note']}"]
    for line in lines:
        out.print(plain(line), markup=False, highlight=False)

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
    teacher_weights: Optional[Path] = typer.Option(None, "--teacher-weights", show_default="none", help="State dict for a file.py:build teacher."),
    student: Optional[str] = typer.Option(None, "--student", show_default="none: give this or --student-width", help="Student model (factory, TorchScript, .pt2)."),
    student_weights: Optional[Path] = typer.Option(None, "--student-weights", show_default="none", help="State dict for a file.py:build student."),
    student_width: Optional[float] = typer.Option(None, "--student-width", show_default="none: give this or --student", help="Derive a slimmer copy of the teacher with this fraction of its channels, e.g. 0.5."),
    train: Path = typer.Option(..., "--train", help="Training data (x, y)."),
    eval_data: Path = typer.Option(..., "--eval", help="Evaluation data (x, y) for the accuracy of teacher and student."),
    out_dir: Path = typer.Option(Path("dist/student"), "--out", "-o", help="Folder for student.pt2 and student.onnx."),
    temperature: float = typer.Option(4.0, "--temperature", help="Softmax temperature of the distillation loss."),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the distillation loss (1-alpha on labels)."),
    epochs: int = typer.Option(30, "--epochs", help="Training epochs."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate (Adam)."),
    schedule: str = typer.Option("cosine", "--schedule", help="Learning-rate schedule: constant, step or cosine."),
    warmup_epochs: int = typer.Option(0, "--warmup-epochs", help="Epochs of linear learning-rate warm-up."),
    l1: float = typer.Option(0.0, "--l1", help="L1 penalty on weights."),
    l2: float = typer.Option(0.0, "--l2", help="L2 penalty (weight decay)."),
    patience: Optional[int] = typer.Option(None, "--patience", show_default="no early stopping", help="Stop after this many epochs without better eval accuracy."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and data order."),
    input_shape: list[str] = typer.Option([], "--input-shape", help="NAME=1,3,224,224 when the models do not say (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Train a small student from a teacher (KL on softened logits + cross-entropy); writes a .pt2 and ONNX."""
    from edgepack.api import distill as do_distill
    from edgepack.cli.progress import Progress

    quiet_torch()  # distillation is PyTorch throughout: torch's own log handlers off

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
            out_dir: Path = typer.Option(Path("compare"), "--out", "-o", help="Folder for compare.md and compare.html."),
            as_json: bool = typer.Option(False, "--json")):
    """Put runs from several devices or candidates side by side (Markdown and HTML)."""
    from edgepack.report.compare import compare_reports

    paths = compare_reports(files, out_dir)
    if as_json:
        emit_json({"written": [str(p) for p in paths], "runs": len(files)})
        return
    out.print(f"compared {len(files)} run{'s' if len(files) != 1 else ''}; wrote:", highlight=False)
    for p in paths:
        out.print(f"  {p}", highlight=False)
