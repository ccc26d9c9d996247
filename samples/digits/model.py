"""Small CNN for scikit-learn's 8x8 digits: input (N, 1, 8, 8) float32 in [0, 1], output 10 logits."""
import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),                                   # 8x8 -> 4x4
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AvgPool2d(2),                                   # 4x4 -> 2x2
        )
        self.classifier = nn.Linear(128 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def build() -> nn.Module:
    """The untrained network; load weights.pt into it with load_state_dict."""
    return DigitsCNN()


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.zeros(1, 1, 8, 8, dtype=torch.float32),)
