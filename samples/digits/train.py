"""Train the digits CNN and write weights.pt, model.onnx, calib.npz, eval.npz, train.npz next to this file.

Run: .venv/bin/python samples/digits/train.py   (fixed seed, about 20-40 s on 2 CPU cores)
"""
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (samples/common.py: split, training loop, export)

EPOCHS = 15


def main() -> None:
    common.seed_everything()
    x_tr, x_ev, y_tr, y_ev = common.split(channel=True)   # (N, 1, 8, 8) in [0, 1]
    mod = common.load_build(HERE, "digits_model")
    model = mod.build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    common.train(model, x_tr, y_tr, epochs=EPOCHS, opt=opt, sched=sched, step_per_batch=False, shift_dims=(2, 3))
    common.write_outputs(HERE, model, mod, x_tr, x_ev, y_tr, y_ev)


if __name__ == "__main__":
    main()
