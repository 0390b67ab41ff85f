"""Data sets for the scale-out tests: one that fails at an index, one that is slow."""

from marstore.models import synthetic_video_actions


class Failing:
    """The synthetic samples, but those at fail_at (an index, or several) cannot be read."""

    def __init__(self, size: int, fail_at: int | list[int]):
        self.base = synthetic_video_actions(size=size)
        self.fail_at = [fail_at] if isinstance(fail_at, int) else list(fail_at)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i in self.fail_at:
            raise RuntimeError(f"sample {i} is unreadable")
        return self.base[i]

    def __iter__(self):  # as an iterable data set (failing_stream), whose iterator ends at the error
        for i in range(len(self)):
            yield self[i]


def failing(size: int = 20, fail_at: int | list[int] = 5) -> Failing:
    return Failing(size, fail_at)


def failing_stream(size: int = 20, fail_at: int = 5):
    import torch

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(Failing(size, fail_at))

    return Stream()


class Slow:
    """The synthetic samples, 3 ms each: an extraction that lasts long enough to be killed."""

    def __init__(self, size: int):
        self.base = synthetic_video_actions(size=size)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        import time

        time.sleep(0.003)
        return self.base[i]


def slow(size: int = 2000) -> Slow:
    return Slow(size)
