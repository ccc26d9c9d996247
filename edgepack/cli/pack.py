"""`edgepack pack`: flags → Recipe → api.pack, with progress on stderr and the candidate table at the end."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgepack.cli.common import boundary, emit_json, err, out, parse_drop, parse_shapes
from edgepack.errors import EdgepackError


@boundary
def pack(
    model: Optional[str] = typer.Argument(None, help="ONNX, TorchScript, .pt2, or file.py:build. Default: the digits sample."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target name (edgepack targets) or a .toml path. Default cpu-x86."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Bundle directory. Default dist/<model>-<target>."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data: .npz/.npy or a folder of them."),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="Evaluation data with labels (x, y) for accuracy."),
    train: Optional[Path] = typer.Option(None, "--train", help="Training data (x, y) for fine-tuning."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="State dict for a file.py:build factory."),
    input_shape: list[str] = typer.Option([], "--input-shape", help="NAME=1,3,224,224 (repeatable)."),
    precision: list[str] = typer.Option([], "--precision", "-p", help="Limit candidates: fp32, fp16, int8, int8-dynamic, int4."),
    max_drop: Optional[str] = typer.Option(None, "--max-drop", help="Accuracy points allowed to lose (default 1)."),
    prune_threshold: Optional[float] = typer.Option(None, "--prune-threshold", help="Magnitude pruning: w=0 where |w|<T."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Magnitude pruning to this sparsity (0-1)."),
    sparsity_scope: str = typer.Option("global", "--sparsity-scope", help="global or per-layer."),
    prune_all_layers: bool = typer.Option(False, "--prune-all-layers", help="Also prune the first and last layers."),
    structured_prune: Optional[float] = typer.Option(None, "--structured-prune", help="Remove this fraction of channels (PyTorch models), then fine-tune."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="constant, step or cosine."),
    warmup_epochs: Optional[int] = typer.Option(None, "--warmup-epochs"),
    l1: Optional[float] = typer.Option(None, "--l1", help="L1 penalty on weights."),
    l2: Optional[float] = typer.Option(None, "--l2", help="L2 penalty (weight decay)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Early stopping on eval accuracy."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe TOML (flags override it)."),
    save_recipe: Optional[Path] = typer.Option(None, "--save-recipe", help="Write the resolved recipe as TOML."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan and stop."),
    batch: Optional[str] = typer.Option(None, "--batch", help="Batch sizes for the latency sweep, e.g. 1,4,16."),
    bench_time: Optional[float] = typer.Option(None, "--bench-time", help="Seconds of timing per candidate."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads for every runtime (default: physical cores)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    guard: Optional[bool] = typer.Option(None, "--guard/--no-guard", help="Keep sensitive layers in float when int8 breaks the budget."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    archive: bool = typer.Option(False, "--archive", help="Also write <out>.tar.gz."),
    strict: bool = typer.Option(False, "--strict", help="Exit 3 when no candidate meets the accuracy budget."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Unpickle a trusted .pt file (runs code from it)."),
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep the work directory."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable result on stdout."),
):
    """Compress MODEL for a target, measure every candidate, and write the best as a verified bundle."""
    from edgepack import api
    from edgepack.cli.progress import Progress
    from edgepack.recipe import load_recipe, recipe_from_flags, recipe_to_toml

    base = load_recipe(recipe) if recipe else None
    train_opts = {"epochs": epochs, "lr": lr, "schedule": schedule, "warmup_epochs": warmup_epochs,
                  "l1": l1, "weight_decay": l2, "patience": patience}
    rec = recipe_from_flags(
        base, target=target, precision=precision, max_drop=parse_drop(max_drop) if max_drop else None,
        seed=seed, guard=guard, batch=batch, bench_time=bench_time, threads=threads,
        prune_threshold=prune_threshold, sparsity=sparsity, sparsity_scope=sparsity_scope,
        prune_all_layers=prune_all_layers, structured_prune=structured_prune, train_opts=train_opts)
    if save_recipe:
        try:
            save_recipe.write_text(recipe_to_toml(rec), encoding="utf-8")
        except OSError as e:
            raise EdgepackError(f"could not write --save-recipe {save_recipe}: {e.strerror or e}") from None
    with Progress(err, enabled=not as_json) as progress:
        result = api.pack(model, target=rec.target, out=out_dir, calib=calib, eval=eval_data, train=train,
                          weights=weights, input_shapes=parse_shapes(input_shape), recipe=rec, force=force,
                          archive=archive, strict=strict, dry_run=dry_run, allow_pickle=allow_pickle,
                          keep_work=keep_work, on_event=progress.event)
    if dry_run:
        plan = result.plan.describe()
        if save_recipe:
            plan["recipe_saved"] = str(save_recipe)
        if as_json:
            emit_json(plan)
        else:
            from edgepack.cli.render import render_plan

            render_plan(out, plan)
        return
    from edgepack.report.json import report_to_dict

    if as_json:
        emit_json({"bundle": str(result.bundle), "archive": str(result.archive) if result.archive else None,
                   "chosen": result.report.chosen, "reason": result.report.reason,
                   "report": report_to_dict(result.report)})
        return
    from edgepack.cli.render import candidates_table
    from edgepack.report.build import noise_warnings

    out.print(candidates_table(result.report))
    out.print(f"chosen: [bold]{result.report.chosen}[/] — {result.report.reason}", highlight=False)

    for w in dict.fromkeys([*result.report.warnings, *noise_warnings(result.report)]):
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    out.print(f"bundle: {result.bundle}" + (f"\narchive: {result.archive}" if result.archive else ""))
