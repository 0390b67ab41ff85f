"""A data set and a model that draw from the global random generators, as augmentations and MAR's
masking do: torch's, numpy's and Python's."""

import random

import numpy as np
import torch
from torch import nn


class NoisyItems(torch.utils.data.Dataset):
    """Each item's values are drawn in __getitem__ (a random augmentation)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        x = torch.rand(4) + torch.from_numpy(np.random.rand(4)).float() + random.random()
        return {"x": x}


class NoisyStream(torch.utils.data.IterableDataset):
    """The same items, drawn as an iterator makes them."""

    def __init__(self, size: int):
        self.items = NoisyItems(size)

    def __iter__(self):
        return (self.items[i] for i in range(len(self.items)))


class NoisyForward(nn.Module):
    """Adds noise drawn in the forward (dropout in train mode, a diffusion loss's noise)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x) + torch.from_numpy(np.random.randn(*x.shape)).float().to(x.device) + random.gauss(0, 1)
        return self.out(self.fc(x) + noise).sum()


def noisy_items(size: int = 40) -> NoisyItems:
    return NoisyItems(size)


def noisy_stream(size: int = 40) -> NoisyStream:
    return NoisyStream(size)


def noisy_forward() -> NoisyForward:
    return NoisyForward()
