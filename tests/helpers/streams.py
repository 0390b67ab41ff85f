"""Data sets for the extraction tests: the built-in synthetic samples as streams, with a text field, as namedtuples
and dataclasses."""

import collections
import dataclasses

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


class _Samples(torch.utils.data.Dataset):
    """The built-in samples, each changed by the subclass's __getitem__."""

    def __init__(self, size: int):
        self.samples = synthetic_video_actions(size=size)

    def __len__(self) -> int:
        return len(self.samples)


class NamedSamples(_Samples):
    """The built-in samples with a text field beside them (a task name, say), and the same as bytes."""

    def __getitem__(self, i: int) -> dict:
        return {**self.samples[i], "task": ["push", "pick", "place é"][i % 3], "raw": f"task{i % 3}".encode()}


def named_samples(size: int = 40) -> NamedSamples:
    return NamedSamples(size)


Sample = collections.namedtuple("Sample", "imgs cond nactions label")


class TupleSamples(_Samples):
    """The built-in samples as namedtuples (DataLoader keeps the type in its batches)."""

    def __getitem__(self, i: int) -> Sample:
        return Sample(*(self.samples[i][k] for k in Sample._fields))


def tuple_samples(size: int = 40) -> TupleSamples:
    return TupleSamples(size)


def tuple_forward(model, batch: Sample):
    return model(batch.imgs, batch.cond, nactions=batch.nactions, task_mode="policy_model")


@dataclasses.dataclass
class SampleRecord:
    imgs: torch.Tensor
    cond: torch.Tensor
    nactions: torch.Tensor
    label: torch.Tensor
    frames: int = dataclasses.field(init=False)  # set by __post_init__, as a computed field is

    def __post_init__(self) -> None:
        self.frames = self.imgs.shape[-4]


class DataclassSamples(_Samples):
    """The built-in samples as dataclasses, which torch's collate does not batch."""

    def __getitem__(self, i: int) -> SampleRecord:
        return SampleRecord(*(self.samples[i][k] for k in ("imgs", "cond", "nactions", "label")))


def dataclass_samples(size: int = 40) -> DataclassSamples:
    return DataclassSamples(size)


def dataclass_forward(model, batch: SampleRecord):
    assert isinstance(batch, SampleRecord) and batch.frames.tolist() == [batch.imgs.shape[-4]] * len(batch.imgs), batch
    return model(batch.imgs, batch.cond, nactions=batch.nactions, task_mode="policy_model")


class WithExtra(_Samples):
    """The built-in samples with one more field: None in every item ("none"), None in odd items
    ("some_none"), or a tensor whose length changes from item to item ("uneven")."""

    def __init__(self, size: int, extra: str):
        super().__init__(size)
        self.extra = extra

    def __getitem__(self, i: int) -> dict:
        value = {"none": None, "some_none": None if i % 2 else torch.zeros(2), "uneven": torch.zeros(1 + i % 3)}[self.extra]
        return {**self.samples[i], "text_latents": value}


def with_extra(size: int = 40, extra: str = "none") -> WithExtra:
    return WithExtra(size, extra)
