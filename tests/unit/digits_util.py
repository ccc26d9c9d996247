"""The load_digits dataset and the small CNN that test_train, test_distill and test_structured share."""
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from edgepack.data import Dataset
from edgepack.steps.train import TrainConfig, fit
from edgepack.types import Artifact, ModelFormat


def dataset(x, y, source="digits"):
    return Dataset(inputs={"x": x}, labels=y, source=source)


def digits():
    """(train, eval): 1400 and 397 digits in a fixed random order, x float32 (N, 1, 8, 8) in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    order = np.random.default_rng(0).permutation(len(y))
    tr, ev = order[:1400], order[1400:]
    return dataset(x[tr], y[tr].astype(np.int64)), dataset(x[ev], y[ev].astype(np.int64), "digits-eval")


def cnn():
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def params(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Import into a test module to run its tests on one torch thread: tiny models gain nothing from threads,
    and one thread stays fast on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trained_cnn(**artifact_kw):
    """cnn() fitted 5 epochs on digits() (seed 0), as a torch Artifact; returns (artifact, train, eval)."""
    train, ev = digits()
    torch.manual_seed(0)
    model = cnn()
    fit(model, train, ev, TrainConfig(epochs=5, lr=3e-3), seed=0)
    art = Artifact(path=Path("cnn.py"), format=ModelFormat.TORCH, module=model,
                   example_inputs=(torch.from_numpy(train.inputs["x"][:1]),), **artifact_kw)
    return art, train, ev
