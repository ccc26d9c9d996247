"""Load a model (ONNX, OpenVINO IR, TorchScript, torch.export, Python factory), describe it, export it to ONNX.

Format detection looks at the file's content, not only its name. Nothing is unpickled unless the user
asks for it (`allow_pickle`): torch weights are read with `weights_only=True`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import re
import sys
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .errors import ModelError, StepError
from .types import Artifact, ModelFormat, TensorSpec

log = logging.getLogger(__name__)

FACTORY_HINT = ("Save a state_dict and pass a factory: `edgepack pack model.py:build --weights weights.pt` "
                "or export TorchScript/torch.export")
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Leading bytes of common files that are not models (checked before parsing, for a clear message)
_NOT_MODELS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
               (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"\x7fELF", "an executable"))


# ---------------------------------------------------------------- loading

def load_model(source: str | Path, *, weights: Path | None = None,
               input_shapes: dict[str, tuple[int, ...]] | None = None, allow_pickle: bool = False) -> Artifact:
    """Load `source` (a model file or `file.py:fn`) into an Artifact; ModelError when it is not a usable model."""
    text = str(source)
    factory = _factory_spec(text)
    if factory:
        return _load_factory(*factory, weights=weights, input_shapes=input_shapes)
    path = Path(text)
    if not path.exists():
        raise ModelError(f"model file {path} not found")
    if path.is_dir():
        raise ModelError(f"{path} is a directory; pass the model file (.onnx, .xml, .pt, .pt2) or file.py:build")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ModelError(f"{path} is empty; pass a model file")
    if head.startswith(b"PK\x03\x04"):
        return _load_torch_archive(path, input_shapes, allow_pickle)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return _load_pickle(path, allow_pickle)
    if path.suffix.lower() == ".xml" or head.lstrip().startswith((b"<?xml", b"<net")):
        return _load_openvino(path)
    if path.suffix.lower() not in (".onnx", ".ort", ""):
        try:
            return _load_onnx(path)
        except ModelError:
            raise ModelError(f"{path} is not a recognised model file; edgepack reads ONNX, OpenVINO .xml, "
                             "TorchScript, torch.export .pt2 and file.py:build factories") from None
    return _load_onnx(path)


def _factory_spec(text: str) -> tuple[Path, str] | None:
    file, _, fn = text.rpartition(":") if ":" in text else (text, "", "build")
    if file.endswith(".py") and fn.isidentifier():
        return Path(file), fn
    return (Path(text), "build") if text.endswith(".py") else None


def _load_onnx(path: Path) -> Artifact:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        with open(path, "rb") as f:
            head = f.read(8)
        kind = next((k for magic, k in _NOT_MODELS if head.startswith(magic)), None)
        what = f"; the file is {kind}, not a model" if kind else ""
        raise ModelError(f"{path} is not a valid ONNX model: {_first_line(e)}{what}") from e
    if not model.HasField("graph") or model.ir_version <= 0:
        raise ModelError(f"{path} is not a valid ONNX model: no graph or IR version in the file")
    files = [path]
    for loc in _external_locations(model):
        data = path.parent / loc
        if not data.is_file():
            raise ModelError(f"{path} keeps its weights in '{loc}', which is missing; "
                             f"put {loc} next to {path.name}")
        files.append(data)
    _check_onnx(path, model, external=len(files) > 1)
    return Artifact(path=path, format=ModelFormat.ONNX, files=tuple(files), metadata=_metadata(model))


def _check_onnx(path: Path, model, external: bool) -> None:
    """onnx.checker on the path (never on bytes: models over 2 GB must work); full check where it can run."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        return
    except Exception as e:  # ValidationError, InferenceError
        full_error = e
    custom = {n.domain for n in _nodes(model.graph)} - set(STANDARD_DOMAINS)
    if custom or external:  # shape inference sees neither custom domains (com.microsoft) nor external tensors
        try:
            onnx.checker.check_model(str(path))
            log.info("%s: plain ONNX check only (%s)", path, _first_line(full_error))
            return
        except Exception as e:
            full_error = e
    raise ModelError(f"{path} is not a valid ONNX model: {_first_line(full_error)}") from full_error


def _load_openvino(path: Path) -> Artifact:
    bin_file = path.with_suffix(".bin")
    if not bin_file.is_file():
        raise ModelError(f"{path} is an OpenVINO IR without its weights: {bin_file.name} is missing next to it")
    return Artifact(path=path, format=ModelFormat.OPENVINO, files=(path, bin_file))


def _load_torch_archive(path: Path, input_shapes, allow_pickle: bool) -> Artifact:
    try:
        names = zipfile.ZipFile(path).namelist()
    except zipfile.BadZipFile as e:
        raise ModelError(f"{path} is a damaged zip archive: {_first_line(e)}") from e
    if any("/code/" in n for n in names) or any(n.endswith("constants.pkl") for n in names):
        return _load_torchscript(path, input_shapes)
    if any(n.endswith("models/model.json") or n.endswith("archive_format") for n in names):
        return _load_exported(path, input_shapes)
    if any(n.endswith("data.pkl") for n in names):
        return _load_pickle(path, allow_pickle)
    raise ModelError(f"{path} is a zip archive but not TorchScript, torch.export or torch.save output")


def _load_torchscript(path: Path, input_shapes) -> Artifact:
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ModelError(f"{path} is not a valid TorchScript archive: {_first_line(e)}") from e
    module.eval()
    return Artifact(path=path, format=ModelFormat.TORCH, files=(path,), module=module,
                    example_inputs=_shapes_to_inputs(input_shapes))


def _load_exported(path: Path, input_shapes) -> Artifact:
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise ModelError(f"{path} is not a valid torch.export program: {_first_line(e)}") from e
    examples = _shapes_to_inputs(input_shapes)
    if examples is None and program.example_inputs is not None:
        args, kwargs = program.example_inputs
        examples = tuple(args) if not kwargs else None
    if examples is None:  # the program's own input specs, when every dim is a number
        examples = _inputs_from_program(program)
    return Artifact(path=path, format=ModelFormat.TORCH, files=(path,), module=program.module(),
                    example_inputs=examples)


def _inputs_from_program(program):
    import torch

    user = set(program.graph_signature.user_inputs)
    out = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            if val is None or not all(isinstance(d, int) for d in val.shape):
                return None
            out.append(torch.zeros(tuple(val.shape), dtype=val.dtype))
    return tuple(out) or None


def _load_pickle(path: Path, allow_pickle: bool) -> Artifact:
    import torch

    if not allow_pickle:
        try:  # weights_only refuses every global outside plain tensors and containers: nothing runs
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            obj = None
        if isinstance(obj, dict):
            raise ModelError(f"{path} holds weights only (a state dict), not a model; pass the code that "
                             f"builds it: `edgepack pack model.py:build --weights {path}`")
        raise ModelError(f"{path} is a pickled Python object; edgepack does not unpickle untrusted files. "
                         + FACTORY_HINT)
    log.warning("unpickling %s because allow_pickle is set: only do this for files you trust", path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelError(f"{path} could not be unpickled: {_first_line(e)}") from e
    if not isinstance(obj, torch.nn.Module):
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module. " + FACTORY_HINT)
    obj.eval()
    return Artifact(path=path, format=ModelFormat.TORCH, files=(path,), module=obj)


def _load_factory(file: Path, fn_name: str, *, weights, input_shapes) -> Artifact:
    import torch

    if not file.is_file():
        raise ModelError(f"model file {file} not found")
    module_name = f"edgepack_user_{hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:10]}_{time.time_ns()}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ModelError(f"{file} cannot be imported as a Python module")
    user = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = user  # dataclasses and friends look their module up here
    try:
        spec.loader.exec_module(user)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise ModelError(f"importing {file} failed: {type(e).__name__}: {_first_line(e)}") from e
    fn = getattr(user, fn_name, None)
    if not callable(fn):
        raise ModelError(f"{file} has no function '{fn_name}'; define `def {fn_name}(): return model` "
                         f"or name the function as {file}:<name>")
    try:
        module = fn()
    except Exception as e:
        raise ModelError(f"{file}:{fn_name}() failed: {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"{file}:{fn_name}() returned a {type(module).__name__}, not a torch.nn.Module")
    files = [file]
    if weights is not None:
        _load_weights(module, Path(weights), f"{file}:{fn_name}")
        files.append(Path(weights))
    module.eval()
    examples = _shapes_to_inputs(input_shapes)
    if examples is None and callable(getattr(user, "example_inputs", None)):
        try:
            examples = user.example_inputs()
        except Exception as e:
            raise ModelError(f"{file}:example_inputs() failed: {type(e).__name__}: {_first_line(e)}") from e
        examples = (examples,) if isinstance(examples, torch.Tensor) else tuple(examples)
    if examples is None:
        raise ModelError(f"cannot tell the input shape of {file}:{fn_name}; pass --input-shape (e.g. 1,3,224,224) "
                         f"or define example_inputs() in {file.name}")
    return Artifact(path=file, format=ModelFormat.TORCH, files=tuple(files), module=module,
                    example_inputs=examples)


def _load_weights(module, weights: Path, what: str) -> None:
    import torch

    if not weights.is_file():
        raise ModelError(f"weights file {weights} not found")
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{weights} is not a safe state dict (tensors only): {_first_line(e)}. "
                         "Save it with torch.save(model.state_dict(), path)") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{weights} is not a state dict of tensors; save it with torch.save(model.state_dict(), path)")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatch", shapes)) if items]
    if problems:
        raise ModelError(f"weights {weights} do not fit {what}: " + "; ".join(problems))
    try:
        module.load_state_dict(state, strict=True)
    except Exception as e:
        raise ModelError(f"weights {weights} do not fit {what}: {_first_line(e)}") from e


def _shapes_to_inputs(input_shapes):
    if not input_shapes:
        return None
    import torch

    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(tuple(int(d) for d in shape), generator=gen) for shape in input_shapes.values())


# ---------------------------------------------------------------- describing

def io_specs(artifact: Artifact) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output tensors of an ONNX, OpenVINO IR or torch artifact."""
    if artifact.format is ModelFormat.ONNX:
        import onnx

        graph = onnx.load(str(artifact.path), load_external_data=False).graph
        inits = {t.name for t in graph.initializer}
        return ([_onnx_spec(v) for v in graph.input if v.name not in inits], [_onnx_spec(v) for v in graph.output])
    if artifact.format is ModelFormat.OPENVINO:
        import openvino as ov

        model = ov.Core().read_model(str(artifact.path))
        return [_ov_spec(p) for p in model.inputs], [_ov_spec(p) for p in model.outputs]
    examples = _examples(artifact)
    outputs = _flat(_forward(artifact.module, examples))
    in_names, out_names = _names("input", len(examples)), _names("output", len(outputs))
    return ([TensorSpec(n, _torch_dtype(t), tuple(t.shape)) for n, t in zip(in_names, examples)],
            [TensorSpec(n, _torch_dtype(t), tuple(t.shape)) for n, t in zip(out_names, outputs)])


def _onnx_spec(value) -> TensorSpec:
    from onnx.helper import tensor_dtype_to_np_dtype

    tt = value.type.tensor_type
    dtype = tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "float32"
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return TensorSpec(value.name, dtype, dims)


def _ov_spec(port) -> TensorSpec:
    import numpy as np

    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), np.dtype(port.get_element_type().to_dtype()).name, shape)


def _torch_dtype(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def count_parameters(artifact: Artifact) -> int:
    """Number of weights: torch parameters, ONNX initializers plus Constant tensors, OpenVINO constants."""
    if artifact.format is ModelFormat.TORCH:
        return int(sum(p.numel() for p in artifact.module.parameters()))
    if artifact.format is ModelFormat.OPENVINO:
        import openvino as ov

        model = ov.Core().read_model(str(artifact.path))
        return int(sum(_prod(op.get_output_shape(0)) for op in model.get_ordered_ops() if op.get_type_name() == "Constant"))
    import onnx

    return _onnx_parameters(onnx.load(str(artifact.path), load_external_data=False).graph)


def _onnx_parameters(graph) -> int:
    return int(sum(_prod(t.dims) for t in _tensors(graph)))


def inspect_model(path: Path) -> dict:
    """A summary of a model: format, inputs, outputs, op histogram, parameters, size, opsets, metadata."""
    artifact = load_model(path)
    ins, outs = io_specs(artifact) if artifact.format is not ModelFormat.TORCH or artifact.example_inputs is not None \
        else ([], [])
    info: dict[str, Any] = {
        "path": str(artifact.path), "format": artifact.format.value,
        "inputs": [s.to_dict() for s in ins], "outputs": [s.to_dict() for s in outs],
        "parameters": count_parameters(artifact),
        "size_bytes": sum(f.stat().st_size for f in artifact.files),
        "files": [str(f) for f in artifact.files], "metadata": dict(artifact.metadata),
    }
    if artifact.format is ModelFormat.ONNX:
        import onnx

        model = onnx.load(str(artifact.path), load_external_data=False)
        ops = Counter(n.op_type if n.domain in STANDARD_DOMAINS else f"{n.domain}.{n.op_type}" for n in _nodes(model.graph))
        info.update(ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
                    opset={o.domain or "ai.onnx": o.version for o in model.opset_import},
                    producer=f"{model.producer_name} {model.producer_version}".strip(), ir_version=model.ir_version)
    elif artifact.format is ModelFormat.OPENVINO:
        import openvino as ov

        ops = Counter(op.get_type_name() for op in ov.Core().read_model(str(artifact.path)).get_ordered_ops())
        info["ops"] = dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return info


def file_sha256(paths) -> str:
    """SHA-256 of one file (same as `sha256sum`), or of several: the sha256sum lines of each, sorted by name."""
    items = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    digests = []
    for p in items:
        h = hashlib.sha256()
        try:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise ModelError(f"cannot read {p} to hash it: {e.strerror}") from e
        digests.append((p.name, h.hexdigest()))
    if len(digests) == 1:
        return digests[0][1]
    lines = "".join(f"{d}  {name}\n" for name, d in sorted(digests))
    return hashlib.sha256(lines.encode()).hexdigest()


# ---------------------------------------------------------------- ONNX helpers

def _nodes(graph) -> Iterable:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)


def _tensors(graph) -> Iterable:
    """Weights: initializers and Constant-node tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _external_locations(model) -> list[str]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    seen: dict[str, None] = {}
    for t in _tensors(model.graph):
        if uses_external_data(t):
            seen[ExternalDataInfo(t).location] = None
    return list(seen)


def _metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    lines = text.splitlines()
    first = lines[0].strip() if lines else type(e).__name__
    if first.endswith(":") and len(lines) > 1:  # "... of node:\nname: OpType: Relu\n is not ...": keep the sense
        first = " ".join(" ".join(ln.split()) for ln in lines[:4] if ln.strip())
    return first[:300]


# ---------------------------------------------------------------- export

def export_onnx(artifact: Artifact, out_dir: Path, *, opset: int, dynamic_batch: bool = True) -> Artifact:
    """Export a torch artifact to `out_dir/model.onnx`, checked against torch with ONNX Runtime.

    The batch dimension is dynamic when the model allows it (checked at batch 1 and 3); otherwise the
    export is static and a note says why. ONNX artifacts are returned as they are.
    """
    if artifact.format is ModelFormat.ONNX:
        return artifact
    if artifact.format is not ModelFormat.TORCH:
        raise StepError(f"cannot export a {artifact.format.value} model to ONNX; pass a PyTorch model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    examples = _examples(artifact)
    module = artifact.module
    n_out = len(_flat(_forward(module, examples)))
    in_names, out_names = _names("input", len(examples)), _names("output", n_out)
    notes: list[str] = []
    dynamic = dynamic_batch and all(t.dim() > 0 for t in examples)
    exporter = _pick_exporter(module, opset)
    if dynamic:
        try:
            used = _export(module, examples, out, opset, in_names, out_names, True, exporter)
            diff = _verify(module, examples, out, in_names, batches=(1, 3))
            log.info("exported with %s exporter (dynamic batch), max diff %.3g", used, diff)
        except (StepError, _Mismatch) as e:
            notes.append(f"fixed batch {examples[0].shape[0]}: dynamic batch export failed ({e})")
            dynamic = False
    if not dynamic:
        used = _export(module, examples, out, opset, in_names, out_names, False, exporter)
        try:
            _verify(module, examples, out, in_names, batches=(None,))
        except _Mismatch as e:
            notes.append(f"ONNX output differs from torch: {e}")
    if used != exporter:
        notes.append(f"exported with the {used} exporter after the {exporter} exporter failed")
    import onnx

    model = onnx.load(str(out), load_external_data=False)
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if got != opset:
        notes.append(f"exported at opset {got} (asked {opset})")
    if artifact.metadata:
        props = {**_metadata(model), **{str(k): str(v) for k, v in artifact.metadata.items()}}
        del model.metadata_props[:]
        for k, v in props.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(out))
    files = (out, *(out_dir / loc for loc in _external_locations(model)))
    return Artifact(path=out, format=ModelFormat.ONNX, files=files, metadata=dict(artifact.metadata),
                    notes=artifact.notes + tuple(notes))


class _Mismatch(Exception):
    pass


def _pick_exporter(module, opset: int) -> str:
    """torch.export-based ("dynamo") gives clean graphs but only at opset >= 18; TorchScript modules need the
    TorchScript-based exporter; programs from torch.export need dynamo."""
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        return "torchscript"
    if isinstance(module, torch.fx.GraphModule) or opset >= 18:
        return "dynamo"
    return "torchscript"


def _export(module, examples, out: Path, opset, in_names, out_names, dynamic: bool, exporter: str) -> str:
    """Run one exporter, then the other if the first fails; returns the one that worked."""
    import torch

    order = [exporter]
    if not isinstance(module, torch.jit.ScriptModule) and not isinstance(module, torch.fx.GraphModule):
        order.append("torchscript" if exporter == "dynamo" else "dynamo")
    errors = []
    for name in order:
        for f in out.parent.glob(out.name + "*"):
            f.unlink()
        try:
            _run_exporter(module, examples, out, opset, in_names, out_names, dynamic, name)
            return name
        except Exception as e:
            log.debug("%s exporter failed", name, exc_info=True)
            cause = f" ({_first_line(e.__cause__)})" if e.__cause__ is not None else ""
            errors.append(f"{name}: {_first_line(e)}{cause}")
    raise StepError("ONNX export failed: " + "; ".join(errors))


def _run_exporter(module, examples, out: Path, opset, in_names, out_names, dynamic, exporter) -> None:
    import torch

    stdout = io.StringIO()
    chatty = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in chatty]
    with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stdout), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        stack.callback(lambda: log.debug("%s exporter said: %s", exporter, stdout.getvalue()[-2000:]))
        for lg, level in zip(chatty, levels):
            lg.setLevel(logging.WARNING)
            stack.callback(lg.setLevel, level)
        if exporter == "dynamo":
            args = tuple(_tile(t, 2) for t in examples) if dynamic else examples  # batch 1 would be specialised
            big = sum(p.numel() * p.element_size() for p in module.parameters()) > 1_500_000_000
            torch.onnx.export(module, args, str(out), input_names=in_names, output_names=out_names,
                              opset_version=max(opset, 18), dynamo=True, external_data=big, verbose=False,
                              dynamic_shapes=tuple({0: torch.export.Dim.DYNAMIC} for _ in args) if dynamic else None)
        else:
            axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic else None
            torch.onnx.export(module, examples, str(out), input_names=in_names, output_names=out_names,
                              opset_version=opset, dynamo=False, dynamic_axes=axes)
    if dynamic and exporter == "dynamo":
        _rename_batch(out)


def _rename_batch(out: Path) -> None:
    """torch.export names the batch dim like 's77'; call it 'batch' as the TorchScript exporter does."""
    import onnx

    model = onnx.load(str(out), load_external_data=False)
    first = model.graph.input[0].type.tensor_type.shape.dim
    sym = first[0].dim_param if len(first) and first[0].dim_param else None
    if not sym:
        return
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param == sym:
                d.dim_param = "batch"
    onnx.save(model, str(out))


def _verify(module, examples, out: Path, in_names, *, batches) -> float:
    """Run the ONNX file with ONNX Runtime and torch on the same inputs; raise _Mismatch beyond 1e-4."""
    import numpy as np
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise _Mismatch(f"ONNX Runtime cannot load the export: {_first_line(e)}") from e
    worst = 0.0
    for b in batches:
        inputs = examples if b is None else tuple(_tile(t, b, noise=True) for t in examples)
        try:
            ref = [t.detach().numpy() for t in _flat(_forward(module, inputs))]
        except ModelError as e:
            raise _Mismatch(f"torch itself fails at batch {b}") from e
        try:
            got = session.run(None, {n: t.detach().numpy() for n, t in zip(in_names, inputs)})
        except Exception as e:
            raise _Mismatch(f"ONNX Runtime fails at batch {b}: {_first_line(e)}") from e
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise _Mismatch(f"output shape {g.shape} instead of {r.shape} at batch {b}")
            diff = float(np.max(np.abs(r.astype(np.float64) - g))) if r.size else 0.0
            worst = max(worst, diff)
            if not diff <= 1e-4 * max(1.0, float(np.max(np.abs(r))) if r.size else 1.0):
                raise _Mismatch(f"max abs diff {diff:.3g} against torch at batch {b}")
    return worst


def _tile(t, batch: int, noise: bool = False):
    """`t` with `batch` rows: copies of its rows, with a little noise on floats so rows differ."""
    import torch

    reps = (batch + t.shape[0] - 1) // t.shape[0]
    out = t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].clone()
    if noise and out.is_floating_point():
        gen = torch.Generator().manual_seed(batch)
        out = out + 0.01 * torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return out


def _examples(artifact: Artifact) -> tuple:
    import torch

    ex = artifact.example_inputs
    if ex is None:
        raise ModelError(f"cannot tell the input shape of {artifact.path}; pass --input-shape (e.g. 1,3,224,224)")
    ex = (ex,) if isinstance(ex, torch.Tensor) else tuple(ex)
    if not ex or not all(isinstance(t, torch.Tensor) for t in ex):
        raise ModelError(f"example inputs of {artifact.path} must be tensors (a tensor or a tuple of tensors)")
    return ex


def _forward(module, inputs):
    import torch

    try:
        with torch.no_grad():
            return module(*inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ModelError(f"the model fails on inputs of shape {shapes}: {_first_line(e)}; "
                         "check --input-shape") from e


def _flat(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flat(item)]
    raise ModelError(f"the model returns a {type(out).__name__}; edgepack needs tensors (or tuples/dicts of them)")
