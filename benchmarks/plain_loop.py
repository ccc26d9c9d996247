"""A plain timing loop with nothing of edgepack in it: the reference that `edgepack profile` is checked against.

    python plain_loop.py onnxruntime model.onnx input.npz --threads 2 --time 3
    python plain_loop.py openvino model.xml input.npz --threads 2 --time 3

The first array of each input in input.npz (batch 1) is fed. ONNX Runtime: an InferenceSession with default
options and intra_op_num_threads (so ORT's default thread spinning stays on, as in edgepack's sessions and as
users run it); OpenVINO: compile_model on CPU with the latency hint, the thread count and
f32 inference precision. 10 warm-up runs, then `sess.run` / `request.infer` timed one call at a time with
perf_counter_ns for the given seconds. Prints JSON: median, p90, mean, iterations, and the runtime settings.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runtime", choices=["onnxruntime", "openvino"])
    ap.add_argument("model")
    ap.add_argument("inputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time", type=float, default=3.0)
    ap.add_argument("--warmup", type=int, default=10)
    a = ap.parse_args()
    with np.load(a.inputs, allow_pickle=False) as z:
        feeds = {k: np.ascontiguousarray(z[k][:1]) for k in z.files}
    settings = {}
    if a.runtime == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(a.model, sess_options=so, providers=["CPUExecutionProvider"])

        def call():
            sess.run(None, feeds)
        settings = {"intra_op_num_threads": a.threads, "graph_optimization_level": str(so.graph_optimization_level),
                    "allow_spinning": "ORT default (on)"}
    else:
        import openvino as ov

        compiled = ov.Core().compile_model(a.model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                            "INFERENCE_NUM_THREADS": a.threads,
                                                            "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()

        def call():
            request.infer(feeds)
        settings = {k: str(compiled.get_property(k)) for k in
                    ("NUM_STREAMS", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT",
                     "ENABLE_CPU_PINNING")}
    for _ in range(a.warmup):
        call()
    times = []
    end = time.perf_counter() + a.time
    while time.perf_counter() < end or len(times) < 20:
        t0 = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    t = np.array(times)
    print(json.dumps({"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                      "mean_ms": float(t.mean()), "iterations": len(times), "settings": settings}))


if __name__ == "__main__":
    main()
