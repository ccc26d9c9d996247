"""The signal front-end of a model: DSP inside the graph (STFT, filterbanks, magnitude, log) that int8 breaks.

Audio models often compute their features in the graph: a Fourier transform as a Conv or MatMul with fixed
sine/cosine kernels, a magnitude (Mul, Add, Sqrt, Pow), then a Log. Quantizing that chain to 8 bits crushes
the low-energy bins before the log expands them again (dnsmos, swift-f0 and basic-pitch lost their outputs
entirely). The front-end is every node upstream of a Log when no learned activation lies among them: a
learned network has activations, a DSP chain does not. Those nodes stay float; the network after them is
quantized as usual. The same rule serves ONNX graphs and OpenVINO models.
"""
from __future__ import annotations

from collections.abc import Iterable

# ONNX and OpenVINO names of learned activations. Not Clip/Clamp: a DSP chain clamps before its log.
ACTIVATIONS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Elu", "Selu",
    "Softplus", "Mish", "ThresholdedRelu", "Celu", "Softmax", "LSTM", "GRU", "RNN",
    "HSwish", "HSigmoid", "Swish", "SoftPlus", "SoftMax", "LSTMSequence", "GRUSequence",
    "RNNSequence",
})
LOG_OPS = frozenset({"Log"})


def front_end(nodes: Iterable[tuple[str, str, list[str]]]) -> list[str]:
    """Names of the front-end nodes (each Log and its ancestors) from (name, op type, producer names) triples.

    A Log whose ancestors hold a learned activation is inside the network (a log-variance head, a loss) and
    contributes nothing.
    """
    graph = {name: (op, parents) for name, op, parents in nodes}
    keep: dict[str, None] = {}
    for name, (op, _) in graph.items():
        if op not in LOG_OPS:
            continue
        seen = _ancestors(name, graph)
        if not any(graph[n][0] in ACTIVATIONS for n in seen):
            keep.update(dict.fromkeys([*sorted(seen), name]))
    return list(keep)


def _ancestors(name: str, graph: dict[str, tuple[str, list[str]]]) -> set[str]:
    seen: set[str] = set()
    stack = [name]
    while stack:
        for p in graph[stack.pop()][1]:
            if p in graph and p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def onnx_nodes(model) -> list[tuple[str, str, list[str]]]:
    """(name, op type, producer names) of an ONNX graph's top-level nodes (nameless nodes get their output's)."""
    names = [n.name or n.output[0] for n in model.graph.node]
    producer = {o: name for n, name in zip(model.graph.node, names) for o in n.output}
    return [(name, n.op_type, [producer[i] for i in n.input if i in producer])
            for n, name in zip(model.graph.node, names)]


def openvino_nodes(model) -> list[tuple[str, str, list[str]]]:
    """(friendly name, type, producer names) of an OpenVINO model's ops."""
    out = []
    for op in model.get_ordered_ops():
        parents = [v.get_node().get_friendly_name() for v in op.input_values()]
        out.append((op.get_friendly_name(), op.get_type_name(), parents))
    return out


def note(kept: list[str], weighted: int) -> str:
    return (f"kept the signal front-end float ({len(kept)} nodes up to the Log, {weighted} of them Conv/MatMul: "
            "DSP in the graph, which 8 bits would crush)")
