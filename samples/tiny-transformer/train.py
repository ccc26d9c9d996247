"""Train the tiny transformer and write weights.pt, model.onnx, calib.npz, eval.npz, train.npz next to this file.

Run: .venv/bin/python samples/tiny-transformer/train.py   (fixed seed, about 20-40 s on 2 CPU cores)
The split is the same as samples/digits (stratified, 20 % held out, seed 0); only the shape differs.
"""
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (samples/common.py: split, training loop, export)

EPOCHS = 40


def main() -> None:
    common.seed_everything()
    x_tr, x_ev, y_tr, y_ev = common.split(channel=False)   # (N, 8, 8): 8 rows of 8 pixels, in [0, 1]
    mod = common.load_build(HERE, "tiny_transformer_model")
    model = mod.build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-2)
    steps = EPOCHS * ((len(x_tr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    common.train(model, x_tr, y_tr, epochs=EPOCHS, opt=opt, sched=sched, step_per_batch=True, shift_dims=(1, 2),
                 label_smoothing=0.05)
    common.write_outputs(HERE, model, mod, x_tr, x_ev, y_tr, y_ev)


if __name__ == "__main__":
    main()
