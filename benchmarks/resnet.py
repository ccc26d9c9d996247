"""A ResNet-18-shaped CNN at 3x224x224 with random weights, and smooth synthetic images for it.

Used by alternatives.py and profile_accuracy.py. Nothing is downloaded. The convolutions are random
(seeded); the BatchNorm statistics come from a few forward passes in train mode on synthetic images, so that
activations keep a trained network's scale instead of growing through the residual stages. The 100-class
head is a nearest-centroid classifier over the features of 100 "template" images, and the calibration and
evaluation images are noisy variations of those templates: the logits then have the top-1 margin of a trained
network (a random head gives near-ties that any rounding flips). Each image's class is the index of its
template, so eval.npz carries labels `y` and edgepack judges candidates by accuracy (its 1-point budget). The
variations keep KEEP of their template and are noisy enough that fp32 gets some wrong (about 0.95 accuracy
on 300 images), so a quantization that damages the features shows up as lost accuracy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT = "input"
SHAPE = (3, 224, 224)
CLASSES = 100
KEEP = 0.70  # share of the template in each variation: 0.75 gives fp32 accuracy 1.0, 0.66 about 0.88
_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def images(n: int, seed: int) -> np.ndarray:
    """n smooth synthetic RGB images (N, 3, 224, 224), ImageNet-normalized: low-frequency colour fields
    (random 7x7 grids, bilinearly upsampled) plus a little pixel noise."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 7, 7, generator=g)
    mid = torch.rand(n, 3, 28, 28, generator=g)
    x = 0.7 * F.interpolate(coarse, size=SHAPE[1:], mode="bilinear", align_corners=False)
    x += 0.25 * F.interpolate(mid, size=SHAPE[1:], mode="bilinear", align_corners=False)
    x += 0.05 * torch.rand(n, *SHAPE, generator=g)
    return ((x.numpy().clip(0, 1) - _MEAN) / _STD).astype(np.float32)


def build(seed: int = 0, classes: int = CLASSES):
    """ResNet-18 layout (BasicBlock x [2, 2, 2, 2], 64-512 channels, BatchNorm, global pool, Linear)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(512, classes)

        def features(self, x):
            return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)

        def forward(self, x):
            return self.fc(self.features(x))

    torch.manual_seed(seed)
    return ResNet18()


def _variations(templates: np.ndarray, pick, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels): one image per entry of `pick` (or `pick` random ones), KEEP x that template +
    (1 - KEEP) x a fresh image; the label is the template's index."""
    if isinstance(pick, int):
        pick = np.random.default_rng(seed).integers(0, len(templates), pick)
    x = KEEP * templates[pick] + (1.0 - KEEP) * images(len(pick), seed + 500)
    return x.astype(np.float32), np.asarray(pick, np.int64)


def write(out: Path, *, calib_n: int = 32, eval_n: int = 300, seed: int = 0) -> dict[str, Path]:
    """Write model.onnx (opset 17, dynamic batch), calib.npz (key `input`) and eval.npz (`input`, labels `y`)."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model = build(seed)
    model.train()
    with torch.no_grad():
        for m in model.modules():  # BatchNorm running statistics: the exact mean over these passes
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        for i in range(4):
            model(torch.from_numpy(images(16, 1000 + i)))
        model.eval()
        templates = images(CLASSES, seed + 7)
        pick = np.repeat(np.arange(CLASSES), 2)  # centroid of each class: two variations of its template
        mixed, _ = _variations(templates, pick, seed + 11)
        f = torch.cat([model.features(torch.from_numpy(mixed[i:i + 25])) for i in range(0, len(mixed), 25)])
        centroids = f.reshape(CLASSES, 2, -1).mean(1)
        mu = centroids.mean(0)
        w = centroids - mu
        w = 8.0 * w / w.norm(dim=1, keepdim=True) / (f - mu).norm(dim=1).mean()  # logits ~ 8 x cosine
        model.fc.weight.copy_(w)
        model.fc.bias.copy_(-(w @ mu))
    paths = {"model": out / "model.onnx", "calib": out / "calib.npz", "eval": out / "eval.npz"}
    torch.onnx.export(model, (torch.from_numpy(images(1, 99)),), str(paths["model"]), opset_version=17,
                      input_names=[INPUT], output_names=["logits"], dynamo=False,
                      dynamic_axes={INPUT: {0: "batch"}, "logits": {0: "batch"}})
    np.savez(paths["calib"], **{INPUT: _variations(templates, calib_n, seed + 1)[0]})
    x, y = _variations(templates, eval_n, seed + 2)
    np.savez(paths["eval"], **{INPUT: x, "y": y})
    return paths


if __name__ == "__main__":
    import sys

    print(write(Path(sys.argv[1] if len(sys.argv) > 1 else "resnet-bench")))
