"""Models that change hooked tensors in place after their hooks fire, as ResNets do, and a channels-first CNN."""

import torch
from torch import nn


class Block(nn.Module):
    """A ResNet block's pattern on (batch, tokens, features): a norm, ReLU(inplace=True) on its
    output, then += identity."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm(self.fc(x)))
        out += x
        return out


def build(d: int = 8) -> nn.Module:
    return nn.Sequential(Block(d), Block(d))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, size: int, d: int):
        self.size, self.d = size, d

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(3, self.d, generator=torch.Generator().manual_seed(i))


def tokens(size: int = 16, d: int = 8) -> Tokens:
    return Tokens(size, d)


class ConvNet(nn.Module):
    """Channels first, as CNNs are: (batch, channels, height, width) all the way."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.relu(self.bn(self.conv(x))))


def conv_net() -> nn.Module:
    return ConvNet()


class Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(i))


def images() -> Images:
    return Images()
