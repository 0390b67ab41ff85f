"""Data sets for the scale-out tests: one that fails at an index, one that is slow."""

from marstore.models import synthetic_video_actions


class Failing:
    def __init__(self, size: int, fail_at: int):
        self.base, self.fail_at = synthetic_video_actions(size=size), fail_at

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise RuntimeError(f"sample {i} is unreadable")
        return self.base[i]


def failing(size: int = 20, fail_at: int = 5) -> Failing:
    return Failing(size, fail_at)


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
