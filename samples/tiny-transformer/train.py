"""Train the tiny transformer and write weights.pt, model.onnx, calib.npz, eval.npz, train.npz next to this file.

Run: .venv/bin/python samples/tiny-transformer/train.py   (fixed seed, about 20-40 s on 2 CPU cores)
The split is the same as samples/digits (stratified, 20 % held out, seed 0); only the shape differs.
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

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 40


def load_build():
    spec = importlib.util.spec_from_file_location("tiny_transformer_model", HERE / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def split():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)   # (N, 8, 8): 8 rows of 8 pixels, in [0, 1]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)


def train(model, x_tr, y_tr):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-2)
    steps = EPOCHS * ((len(x_tr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    x_t, y_t = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(x_t), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            # light augmentation: random 1-pixel shift of the whole image
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(x_t[idx], shifts=(dy, dx), dims=(1, 2))
            loss = torch.nn.functional.cross_entropy(model(xb), y_t[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
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


def main() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    x_tr, x_ev, y_tr, y_ev = split()
    mod = load_build()
    model = train(mod.build(), x_tr, y_tr)
    torch.save(model.state_dict(), HERE / "weights.pt")
    export(model, mod, HERE / "model.onnx")
    calib = x_tr[np.random.RandomState(SEED).choice(len(x_tr), 128, replace=False)]
    np.savez_compressed(HERE / "calib.npz", input=calib)
    np.savez_compressed(HERE / "eval.npz", x=x_ev, y=y_ev)
    np.savez_compressed(HERE / "train.npz", x=x_tr, y=y_tr)
    sess = ort.InferenceSession(str(HERE / "model.onnx"), providers=["CPUExecutionProvider"])
    acc = float((sess.run(None, {"input": x_ev})[0].argmax(1) == y_ev).mean())
    print(f"eval accuracy (onnxruntime fp32): {acc:.4f} on {len(y_ev)} samples")


if __name__ == "__main__":
    main()
