"""`edgepack pack`: flags → Recipe → api.pack, with progress on stderr and the candidate table at the end."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from edgepack.cli.common import (
    add_warning,
    boundary,
    emit_json,
    err,
    log,
    out,
    parse_drop,
    parse_shapes,
    quiet_torch,
)
from edgepack.errors import EdgepackError


@boundary
def pack(
    model: Optional[str] = typer.Argument(None, show_default="the recipe's model, else the digits sample", help="ONNX, TorchScript, .pt2, or file.py:build."),
    target: Optional[str] = typer.Option(None, "--target", "-t", show_default="the recipe's, else cpu-x86", help="Target name (edgepack targets) or a .toml path."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", show_default="dist/<model>-<target>", help="Bundle directory."),
    calib: Optional[Path] = typer.Option(None, "--calib", show_default="the recipe's; none: static int8 is skipped", help="Calibration data: .npz/.npy or a folder of them."),
    eval_data: Optional[Path] = typer.Option(None, "--eval", show_default="the recipe's; none: fidelity on --calib or random inputs", help="Evaluation data with labels (x, y) for accuracy; without y, fidelity to the original."),
    train: Optional[Path] = typer.Option(None, "--train", show_default="the recipe's, else none", help="Training data (x, y) for fine-tuning."),
    weights: Optional[Path] = typer.Option(None, "--weights", show_default="the recipe's, else none", help="State dict for a file.py:build factory."),
    input_shape: list[str] = typer.Option([], "--input-shape", help="NAME=1,3,224,224 (repeatable)."),
    batch_axis: list[str] = typer.Option([], "--batch-axis", help="INPUT=AXIS: the sample axis of an input whose batch is not axis 0 (repeatable); default: from the model's symbolic dims."),
    metric: list[str] = typer.Option([], "--metric", help="OUTPUT=KIND: judge an output as classes, detection, boxes, sequence, embedding, regression or ignore (repeatable); OUTPUT=regression@GATE judges it only where the original's GATE output is >= 0.5 (@GATE>=T); default: picked from its shape."),
    metric_fn: Optional[str] = typer.Option(None, "--metric-fn", show_default="none", help="module:function(inputs, outputs) -> score, higher is better; the budget is --max-drop of its value on the original."),
    precision: list[str] = typer.Option([], "--precision", "-p", show_default="every precision of the target", help="Limit candidates: fp32, fp16, int8, int8-dynamic, int4 (repeatable or comma-separated)."),
    max_drop: Optional[str] = typer.Option(None, "--max-drop", show_default="1 point", help="Accuracy points allowed to lose, e.g. 1 or 0.5%."),
    prune_threshold: Optional[float] = typer.Option(None, "--prune-threshold", show_default="no pruning", help="Magnitude pruning: w=0 where |w|<T."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", show_default="no pruning", help="Magnitude pruning to this sparsity (0-1)."),
    sparsity_scope: str = typer.Option("global", "--sparsity-scope", help="global or per-layer."),
    prune_all_layers: bool = typer.Option(False, "--prune-all-layers", help="Also prune the first and last layers."),
    structured_prune: Optional[float] = typer.Option(None, "--structured-prune", show_default="no structured pruning", help="Remove this fraction of channels (PyTorch models), then fine-tune."),
    epochs: Optional[int] = typer.Option(None, "--epochs", show_default="30", help="Fine-tuning epochs after --structured-prune."),
    lr: Optional[float] = typer.Option(None, "--lr", show_default="0.001", help="Fine-tuning learning rate (Adam)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", show_default="constant", help="Learning-rate schedule: constant, step or cosine."),
    warmup_epochs: Optional[int] = typer.Option(None, "--warmup-epochs", show_default="0", help="Epochs of linear learning-rate warm-up."),
    l1: Optional[float] = typer.Option(None, "--l1", show_default="0", help="L1 penalty on weights."),
    l2: Optional[float] = typer.Option(None, "--l2", show_default="0", help="L2 penalty (weight decay)."),
    patience: Optional[int] = typer.Option(None, "--patience", show_default="no early stopping", help="Stop fine-tuning after this many epochs without better eval accuracy."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", show_default="none", help="Recipe TOML with the model, data and settings (flags override it)."),
    save_recipe: Optional[Path] = typer.Option(None, "--save-recipe", show_default="not saved", help="Write the resolved recipe as TOML (model and data paths relative to it)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the model, data and plan, and stop."),
    batch: Optional[str] = typer.Option(None, "--batch", show_default="1", help="Batch sizes for the chosen candidate's latency sweep, e.g. 1,4,16."),
    bench_time: Optional[float] = typer.Option(None, "--bench-time", show_default="the target's, 2 s for cpu-x86", help="Seconds of timing for the candidates still in the race, after a short first round each."),
    threads: Optional[int] = typer.Option(None, "--threads", show_default="the target's, else all physical cores", help="Threads for every runtime."),
    seed: Optional[int] = typer.Option(None, "--seed", show_default="0", help="Seed for random inputs, calibration sampling and fine-tuning."),
    guard: Optional[bool] = typer.Option(None, "--guard/--no-guard", show_default="where it could win", help="Keep sensitive layers in float when int8 breaks the budget: --guard always, by default only where the plain int8 is faster than every candidate within budget."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    archive: bool = typer.Option(False, "--archive", help="Also write <out>.tar.gz."),
    strict: bool = typer.Option(False, "--strict", help="Exit 3 when no candidate meets the accuracy budget."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Unpickle a trusted .pt file (runs code from it)."),
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep the work directory (its path is logged)."),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", show_default="not signed", help="Sign the bundle with this Ed25519 private key (PEM or OpenSSH): writes signature.json for verify --trusted-key."),
    on: list[str] = typer.Option([], "--on", help="Time the candidates on this device (edgepack devices add; repeatable)."),
    devices_file: Optional[Path] = typer.Option(None, "--devices", help="Devices file (default: the user config directory's devices.toml)."),
    choose_by: Optional[str] = typer.Option(None, "--choose-by", help="With several --on devices: the device whose numbers choose (default: the slowest)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable result on stdout."),
):
    """Compress MODEL for a target, measure every candidate, and write the best as a verified bundle."""
    from edgepack import api
    from edgepack.cli.progress import Progress
    from edgepack.recipe import load_recipe, recipe_from_flags, recipe_to_toml

    base = load_recipe(recipe) if recipe else None
    given = _inputs(base, model=model, weights=weights, calib=calib, eval=eval_data, train=train)
    train_opts = {"epochs": epochs, "lr": lr, "schedule": schedule, "warmup_epochs": warmup_epochs,
                  "l1": l1, "weight_decay": l2, "patience": patience}
    rec = recipe_from_flags(
        base, target=target, precision=precision, max_drop=parse_drop(max_drop) if max_drop else None,
        seed=seed, guard=guard, batch=batch, bench_time=bench_time, threads=threads,
        prune_threshold=prune_threshold, sparsity=sparsity, sparsity_scope=sparsity_scope,
        prune_all_layers=prune_all_layers, structured_prune=structured_prune, train_opts=train_opts,
        metric=metric, metric_fn=metric_fn, batch_axis=batch_axis)
    rec = rec.model_copy(update={k: v for k, v in given.items() if k != "sample"})
    if re.search(r"\.(pt|pt2|pth|ts)$|\.py(:\w+)?$", given["model"]):
        quiet_torch()  # a PyTorch model imports torch anyway: its own log handlers off
    if given["eval"] and not rec.metric_fn:
        _warn_unlabelled(Path(given["eval"]))
    if save_recipe:
        try:
            save_recipe.write_text(recipe_to_toml(rec, save_recipe.parent), encoding="utf-8")
        except OSError as e:
            raise EdgepackError(f"could not write --save-recipe {save_recipe}: {e.strerror or e}") from None
    with Progress(err, enabled=not as_json) as progress:
        result = api.pack(given["model"], target=rec.target, out=out_dir, calib=given["calib"], eval=given["eval"],
                          train=given["train"], weights=given["weights"], input_shapes=parse_shapes(input_shape),
                          recipe=rec, force=force,
                          archive=archive, strict=strict, dry_run=dry_run, allow_pickle=allow_pickle,
                          keep_work=keep_work, sign_key=sign_key, on=on, devices_file=devices_file, choose_by=choose_by,
                          on_event=progress.event)
    if dry_run:
        plan = {"model": given["model"] + (" (the digits sample)" if given["sample"] else ""),
                "data": {k: given[k] for k in ("weights", "calib", "eval", "train") if given[k]},
                **result.plan.describe()}
        if save_recipe:
            plan["recipe_saved"] = str(save_recipe)
        if as_json:
            emit_json(plan)
        else:
            from edgepack.cli.render import render_plan

            render_plan(out, plan)
        return
    from edgepack.cli.render import candidates_table, chosen_line, next_steps
    from edgepack.report.build import noise_warnings
    from edgepack.report.json import report_to_dict
    from edgepack.report.render import in_points

    for w in [*result.report.warnings, *noise_warnings(result.report)]:
        add_warning(in_points(w))  # printed once, with the run's other warnings, at the end
    steps = next_steps(result.bundle)
    if as_json:
        emit_json({"bundle": str(result.bundle), "archive": str(result.archive) if result.archive else None,
                   "chosen": result.report.chosen, "reason": result.report.reason, "next_steps": steps,
                   "report": report_to_dict(result.report)})
        return
    out.print(candidates_table(result.report))
    out.print(chosen_line(result.report), highlight=False)
    out.print(f"bundle: {result.bundle}" + (f"\narchive: {result.archive}" if result.archive else ""), highlight=False,
              markup=False)
    out.print("next steps:", highlight=False)
    for i, step in enumerate(steps, 1):
        out.print(f"  {i}. {step}", highlight=False, markup=False)


def _inputs(base, **flags) -> dict:
    """Model and data paths: the flags, else the recipe's, else (no model at all) the digits sample."""
    from edgepack import api

    given = {k: str(v) if v is not None else getattr(base, k, None) for k, v in flags.items()}
    given["sample"] = given["model"] is None
    if given["sample"]:
        sample = api.default_sample()
        given["model"] = str(sample["model"])
        given["calib"] = given["calib"] or str(sample["calib"])
        given["eval"] = given["eval"] or str(sample["eval"])
    return given


def _warn_unlabelled(path: Path) -> None:
    """One warning when --eval data has no labels 'y' (judged by fidelity then, not accuracy)."""
    import numpy as np

    files = sorted(path.glob("*.np[yz]")) if path.is_dir() else [path]
    for f in files:
        if f.suffix != ".npz":
            continue
        try:
            with np.load(f, allow_pickle=False) as z:
                if "y" in z.files:
                    return
        except (OSError, ValueError):
            return  # the data loader reports unreadable files
    if files and all(f.exists() for f in files):
        log.warning(f"--eval {path.name} has no labels 'y': candidates are judged by fidelity to the original "
                    "model instead of accuracy (store class ids as y to measure accuracy)")
