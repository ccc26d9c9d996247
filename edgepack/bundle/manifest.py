"""What goes into a bundle besides the model: manifest fields, reference I/O and tolerances, README."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgepack import __version__
from edgepack.errors import BundleError
from edgepack.naming import model_name, shipped_path, simplify_shape
from edgepack.runner import run as runner
from edgepack.types import SCHEMA_VERSION

# Self-test tolerances by precision: (rtol, atol as a fraction of the reference's output range, top-1 minimum)
_TOL = {"fp32": (1e-3, 1e-4, 1.0), "fp16": (1e-2, 1e-2, 0.9), "bf16": (2e-2, 2e-2, 0.9), "int8": (0.0, 0.05, 0.85),
        "int8-dynamic": (0.0, 0.05, 0.85), "int4": (0.0, 0.08, 0.85)}
REFERENCE_SAMPLES = 16
MANIFEST = runner.MANIFEST
SIGNATURE = "signature.json"  # written by `pack --sign-key`; see bundle/sign.py


def load_manifest(bundle: Path) -> dict:
    """The bundle's manifest.json (read by the runner's own code); BundleError naming the file otherwise."""
    path = Path(bundle) / MANIFEST
    try:
        data = runner.load_manifest(bundle)
    except runner.RunError as e:
        raise BundleError(str(e)) from None
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{path} has schema_version {data.get('schema_version')!r}; this edgepack reads "
                          f"{SCHEMA_VERSION}", hint="re-pack the model with this edgepack version")
    return data


def unlisted_files(bundle: Path, manifest: dict) -> list[str]:
    """Everything under the bundle but folders that the manifest does not list (__pycache__ and links too);
    signature.json is the one file that cannot be listed (it signs the manifest)."""
    bundle = Path(bundle)
    listed = set(manifest["files"]) | {MANIFEST, SIGNATURE}
    out = []
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        if (p.is_symlink() or not p.is_dir()) and rel not in listed:
            out.append(rel)
    return out


def bundle_problems(bundle: Path, manifest: dict) -> list[str]:
    """One line per listed file that is missing or changed and per file the manifest does not list."""
    return runner.check_files(bundle, manifest) + [f"{rel}: not listed in {MANIFEST}"
                                                   for rel in unlisted_files(bundle, manifest)]


def replace_refusal(path: Path) -> str | None:
    """Why --force must not replace `path`, or None when it is an intact edgepack bundle (every file listed
    and unchanged): --force never deletes a file that the manifest does not list."""
    path = Path(path)
    try:
        if not path.is_dir() or path.is_symlink():
            raise BundleError("not a folder")
        manifest = load_manifest(path)
    except BundleError:
        return f"{path} exists and is not an edgepack bundle; --force only replaces bundles"
    extra = unlisted_files(path, manifest)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        return (f"{path} holds files its manifest does not list ({', '.join(extra[:3])}{more}); --force never "
                "deletes them (move them out of the bundle, or choose another --out)")
    problems = runner.check_files(path, manifest)
    if problems:
        return (f"{path} does not verify as an edgepack bundle ({problems[0]}); --force only replaces an intact "
                "bundle (restore it, or choose another --out)")
    return None


def is_bundle(path: Path) -> bool:
    """True when `path` is an intact edgepack bundle (what --force may replace)."""
    return replace_refusal(path) is None


def requirements_txt(runtime: dict) -> str:
    """numpy + the runtime's package (its backend names it) pinned to the version that made the references."""
    from edgepack.runtimes import get_backend

    pkg, why = get_backend(runtime["name"]).requirement(runtime)
    version = runtime.get("version")
    lines = ["# Install on the device: python -m pip install -r requirements.txt", "numpy>=1.24"]
    if why:
        lines.append(f"# {why}")
    if version:
        lines.append(f"{pkg}=={str(version).split('-')[0]}")
    else:
        lines += [f"# the runtime version was not recorded when packing; pin {pkg} to the one you tested", pkg]
    return "\n".join(lines) + "\n"


def default_readme(manifest: dict) -> str:
    rt = manifest["runtime"]
    names = ", ".join(i["name"] for i in manifest.get("inputs", []))
    return (f"# edgepack bundle for {manifest.get('target', {}).get('name', '?')}\n\n"
            f"Runtime {rt.get('name')} {rt.get('version')} ({rt.get('provider') or rt.get('device')}), "
            f"precision {manifest.get('precision')}.\n\n```\npython -m pip install -r requirements.txt\n"
            f"python run.py --selftest\npython run.py --input x.npz --output y.npz   # keys: {names}\n"
            f"python run.py --benchmark --json profile.json\n```\n")


def reference_io(chosen, scoring):
    """The first scoring samples and the chosen model's outputs on them (from scoring), with tolerances."""
    n = chosen.batch if chosen.batch != 32 else REFERENCE_SAMPLES  # static models take exactly their batch
    from edgepack.data import take_along

    sub = scoring.data.take(n)
    inputs = {k: np.asarray(v, order="C") for k, v in sub.inputs.items()}
    # an output with no batch axis was stacked per run: the reference is one run's (the inputs are one batch)
    if chosen.session is not None:  # as the self-test runs them (dynamic int8 scales depend on the batch)
        outputs = [np.asarray(o, order="C") for o in runner.run_all(chosen.session.model, chosen.session.check(inputs))]
    else:
        outputs = [np.asarray((o[0] if o.ndim else o) if ax is None else take_along(o, ax, 0, n), order="C")
                   for o, ax in zip(chosen.outputs, scoring.axes or [0] * len(chosen.outputs))]
    rtol, frac, top1 = _TOL.get(chosen.plan.precision.value, _TOL["int8"])
    floor = 1e-4 if chosen.plan.precision.value == "fp32" else 1e-5
    # each output's own range (token ids passed through must not widen the scores' tolerance); integers: exact
    atols = [0.0 if o.dtype.kind in "biu" else max(floor, frac * (float(np.ptp(o)) if o.size else 0.0))
             for o in outputs]
    return inputs, outputs, {"rtol": rtol, "atol": max(atols, default=floor), "top1_min": top1, "atols": atols}


def runtime_section(spec, settings: dict) -> dict[str, Any]:
    """The manifest's runtime section, written by the runtime's backend (settings included)."""
    from edgepack.runtimes import get_backend

    return get_backend(spec.runtime).manifest_section(spec, settings)


def bundle_manifest(report, chosen, the_plan, source, source_sha, in_specs, out_specs, tol,
                    scoring=None) -> dict[str, Any]:
    from edgepack.model.describe import io_specs

    c = next(c for c in report.candidates if c.name == report.chosen)
    try:
        ins, outs = io_specs(chosen.artifact)
    except Exception:
        ins, outs = in_specs, out_specs
    tol = dict(tol)
    atol_of = dict(enumerate(tol.pop("atols", [])))  # per output, in the model's output order
    return {
        "schema_version": SCHEMA_VERSION,
        "edgepack_version": __version__,
        "created": report.created,
        "name": model_name(source.path, source.module),
        "target": {"name": the_plan.target.name, "description": the_plan.target.description},
        "runtime": runtime_section(chosen.plan.runtime, chosen.settings),
        "precision": chosen.plan.precision.value,
        "candidate": c.name,
        "inputs": [{**_spec(s), "batch_axis": _axis(scoring, s.name, True)} for s in ins],
        "outputs": [{**_spec(s), "batch_axis": _axis(scoring, s.name, False), "atol": atol_of.get(i, tol["atol"])}
                    for i, s in enumerate(outs)],
        "source": {"path": shipped_path(source.path), "sha256": source_sha, "format": source.format.value},
        "steps": [{"kind": s.kind, "params": s.params, "changed": s.changed, "summary": s.summary} for s in c.steps],
        "metrics": {
            "accuracy": c.fidelity.accuracy if c.fidelity else None,
            "reference_accuracy": report.budget.get("reference_accuracy"),
            "fidelity": c.fidelity.to_dict() if c.fidelity else None,
            # no timing values here or in README.md: packing twice gives the same manifest but for `created`
            # and the report files' hashes; latency lives in report.json/md/html only
            "latency_note": c.latency_note,
            "size_bytes": c.size_bytes,
        },
        "metadata": dict(source.metadata),
        "reference": {"inputs": "reference/inputs.npz", "outputs": "reference/outputs.npz", **tol},
    }


def _spec(s) -> dict[str, Any]:
    """A tensor spec for the manifest, its symbolic dims simplified ('floor(1.0*batch)' -> 'batch')."""
    return {**s.to_dict(), "shape": simplify_shape(s.shape)}


def _axis(scoring, name: str, is_input: bool) -> int | None:
    """An input's or output's sample axis as pack used it (None: one value for all samples)."""
    if scoring is None:
        return 0
    if is_input:
        return scoring.data.axis(name)
    return dict(zip(scoring.names, scoring.axes)).get(name, 0)


def _dims(shape) -> str:
    """[batch, 1, 8, 8] (no quotes around symbolic dims; ? for unknown ones)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def bundle_readme(manifest: dict, report) -> str:
    rt = manifest["runtime"]
    where = rt.get("provider") or rt.get("device")
    m = manifest["metrics"]
    acc = f"{m['accuracy']:.4f}" if m.get("accuracy") is not None else "n/a (no labels)"
    lat = m.get("latency_note") or "measured on the packing host, see report.md"
    from edgepack.runtimes import get_backend

    pkg = get_backend(rt["name"]).requirement(rt)[0]
    return f"""# {manifest['name']} for {manifest['target']['name']}

Made by edgepack {manifest['edgepack_version']} (date: `created` in manifest.json).
Runtime: {rt['name']} {rt['version']} ({where}), precision {manifest['precision']}.
Accuracy: {acc}. Latency: {lat}.

## Run it on the device
```
python -m pip install -r requirements.txt     # numpy + {pkg}, nothing else
python run.py --selftest                      # hashes + reference outputs
python run.py --input x.npz --output y.npz    # keys: {', '.join(i['name'] for i in manifest['inputs'])}
python run.py --benchmark --json profile.json # latency on this device
```
Inputs: {', '.join(f"{i['name']} {i['dtype']} {_dims(i['shape'])}" for i in manifest['inputs'])}.
Outputs: {', '.join(f"{o['name']} {o['dtype']} {_dims(o['shape'])}" for o in manifest['outputs'])}.
`manifest.json` lists every file's sha256; `report.md` / `report.html` hold the measurements.
"""
