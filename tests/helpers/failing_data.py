"""A data set that fails at one index: for the test of a rank that fails."""

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
