"""Small CNN for scikit-learn's 8x8 digits: input (N, 1, 8, 8) float32 in [0, 1], output 10 logits.

The digit is upsampled to 16x16 inside the network so the convolutions do the amount of work a real
(small) vision model does per image; that is what makes int8 kernels and channel pruning pay off.
"""
import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),       # 8x8 -> 16x16
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),                                   # 16x16 -> 8x8
            nn.Conv2d(64, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),                           # 8x8 -> 1x1
        )
        self.classifier = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def build() -> nn.Module:
    """The untrained network; load weights.pt into it with load_state_dict."""
    return DigitsCNN()


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.zeros(1, 1, 8, 8, dtype=torch.float32),)
