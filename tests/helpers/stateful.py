"""Models that keep state across forwards (a memory bank, a step counter, a last output kept
for a plot), and one that only builds a table at its first call."""

import torch
from torch import nn


class Remembers(nn.Module):
    """Each forward adds to a buffer, replaces a tensor attribute and counts itself."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.register_buffer("bank", torch.zeros(d))
        self.memory = torch.zeros(d)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.fc(x + self.bank + self.memory.to(x.device))  # a plain attribute stays on the CPU in .cuda()
        self.bank.add_(out.detach().mean((0, 1)))
        self.memory = out.detach().mean((0, 1))
        return out


class CachesOnce(nn.Module):
    """Builds a table at its first call, as rotary embeddings do: nothing carried between rows."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.table = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            self.table = torch.ones(x.shape[1:])
        return self.fc(x) * self.table


class FillsItsDefault(nn.Module):
    """UVA's habit: a forward that fills a dict given as its default argument, which outlives the
    call (here a count of its calls); the same key set to the same value each call is no change."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, extra={}, steady={}) -> torch.Tensor:  # noqa: B006 - the habit tested
        extra["calls"] = extra.get("calls", 0) + 1
        steady["mode"] = "policy_model"
        return self.fc(x)


class KeepsTheLast(nn.Module):
    """Keeps its last output for a plot, as models that save attention maps do: written each
    call, never read."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        self.last = out.detach()
        return out


class RefusesARepeat(nn.Module):
    """Refuses the batch it has just seen (a data pipeline's guard): the same batch run again fails."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.seen = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seen is not None and torch.equal(x, self.seen):
            raise ValueError("the same batch twice")
        self.seen = x.clone()
        return self.fc(x)


class OwnNoise(nn.Module):
    """Draws its noise from a generator of its own, which no global seed reaches."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.noise = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + torch.randn(x.shape, generator=self.noise))


def own_noise(d: int = 8) -> OwnNoise:
    return OwnNoise(d)


def keeps_the_last(d: int = 8) -> KeepsTheLast:
    return KeepsTheLast(d)


def refuses_a_repeat(d: int = 8) -> RefusesARepeat:
    return RefusesARepeat(d)


def remembers(d: int = 8) -> Remembers:
    return Remembers(d)


def fills_its_default(d: int = 8) -> FillsItsDefault:
    return FillsItsDefault(d)


def caches_once(d: int = 8) -> CachesOnce:
    return CachesOnce(d)


def normed(d: int = 8) -> nn.Module:
    """Batch norm over the tokens' features: in train mode its running statistics change."""
    return nn.Sequential(nn.Linear(d, d), nn.Flatten(0, 1), nn.BatchNorm1d(d))
