"""What the sample train.py scripts share: the digits split, the training loop, the ONNX export, the output files.

Each script puts this folder on sys.path and passes what differs (model, pixel layout, optimizer, schedule).
"""
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0


def load_build(here: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, here / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def split(channel: bool):
    """Stratified 80/20 split of load_digits, pixels in [0, 1]: (N, 1, 8, 8) with a channel axis, else (N, 8, 8)."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    if channel:
        x = x[:, None, :, :]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)


def train(model, x_tr, y_tr, *, epochs: int, opt, sched, step_per_batch: bool, shift_dims: tuple[int, int],
          label_smoothing: float = 0.0):
    """Minibatches of 64 in a seeded order, each shifted by a random pixel along `shift_dims` (light augmentation)."""
    x_t, y_t = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_t), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(x_t[idx], shifts=(dy, dx), dims=shift_dims)
            loss = torch.nn.functional.cross_entropy(model(xb), y_t[idx], label_smoothing=label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step_per_batch:
                sched.step()
        if not step_per_batch:
            sched.step()
    model.eval()
    return model


def export(model, mod, path: Path) -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)   # legacy exporter: plain, stable graph
    torch.onnx.export(model, mod.example_inputs(), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    m = onnx.load(str(path))
    for key, value in (("labels", ",".join(str(i) for i in range(10))), ("task", "image-classification")):
        m.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def seed_everything() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def write_outputs(here: Path, model, mod, x_tr, x_ev, y_tr, y_ev) -> None:
    """weights.pt, model.onnx, calib.npz (128 training samples), eval.npz, train.npz; then the ONNX accuracy."""
    torch.save(model.state_dict(), here / "weights.pt")
    export(model, mod, here / "model.onnx")
    calib = x_tr[np.random.RandomState(SEED).choice(len(x_tr), 128, replace=False)]
    np.savez_compressed(here / "calib.npz", input=calib)
    np.savez_compressed(here / "eval.npz", x=x_ev, y=y_ev)
    np.savez_compressed(here / "train.npz", x=x_tr, y=y_tr)
    sess = ort.InferenceSession(str(here / "model.onnx"), providers=["CPUExecutionProvider"])
    acc = float((sess.run(None, {"input": x_ev})[0].argmax(1) == y_ev).mean())
    print(f"eval accuracy (onnxruntime fp32): {acc:.4f} on {len(y_ev)} samples")
