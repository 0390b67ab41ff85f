"""Data sets with no length, for the extraction tests: the built-in synthetic samples as streams."""

import torch

from marstore.models import synthetic_video_actions


class SyntheticStream(torch.utils.data.IterableDataset):
    def __init__(self, size: int):
        self.samples = synthetic_video_actions(size=size)

    def __iter__(self):
        return (self.samples[i] for i in range(len(self.samples)))


class PlainIterable:
    """Not a torch data set at all: only __iter__."""

    def __init__(self, size: int):
        self.stream = SyntheticStream(size)

    def __iter__(self):
        return iter(self.stream)


def synthetic_stream(size: int = 40) -> SyntheticStream:
    return SyntheticStream(size)


def plain_iterable(size: int = 40) -> PlainIterable:
    return PlainIterable(size)


def not_a_dataset() -> int:
    return 42
