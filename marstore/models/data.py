"""Synthetic latent "videos" in which the action moves what is in the frames.

Each sample: a Gaussian blob on a grid x grid latent map moves with a velocity given by the
action, frame by frame; `cond` is the frame before. The action (horizon x 2, constant velocity
plus noise) and a discrete label (the direction, one of 8) are the targets. A probe can find
the action in the model's activations only if the model's layers carry the motion.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset


class SyntheticVideoActions(Dataset):
    def __init__(self, size: int = 512, frames: int = 4, channels: int = 4, grid: int = 4, horizon: int = 16,
                 seed: int = 0, noise: float = 0.05):
        self.size, self.frames, self.channels, self.grid, self.horizon = size, frames, channels, grid, horizon
        self.seed, self.noise = seed, noise

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(0, 8, (), generator=g))
        angle = label * math.pi / 4 + float(torch.randn((), generator=g)) * 0.2
        speed = 0.3 + 0.5 * float(torch.rand((), generator=g))
        velocity = torch.tensor([math.cos(angle), math.sin(angle)]) * speed
        start = torch.rand(2, generator=g) * (self.grid - 1)
        coords = torch.stack(torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij"), -1).float()
        weights = torch.randn(self.channels, generator=g) * 0.3 + 1.0

        def frame(t: float) -> torch.Tensor:
            centre = start + velocity * t
            blob = torch.exp(-((coords - centre) ** 2).sum(-1) / 1.5)
            return weights[:, None, None] * blob[None] + self.noise * torch.randn(self.channels, self.grid, self.grid, generator=g)

        imgs = torch.stack([frame(t + 1) for t in range(self.frames)])
        cond = torch.stack([frame(t) for t in range(self.frames)])
        nactions = velocity.expand(self.horizon, 2) + 0.02 * torch.randn(self.horizon, 2, generator=g)
        return {"imgs": imgs, "cond": cond, "nactions": nactions, "label": label}


def synthetic_video_actions(size: int = 512, seed: int = 0, **kwargs) -> SyntheticVideoActions:
    """The built-in data set's factory (what `--dataset marstore.models:synthetic_video_actions` calls)."""
    return SyntheticVideoActions(size=size, seed=seed, **kwargs)
