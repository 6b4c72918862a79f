"""medlora/schedule.py: the warmup/cosine/floor boundaries, and how many steps a run takes."""

import pytest

from medlora.config import TrainConfig
from medlora.schedule import cosine_with_warmup, schedule_lengths


def test_schedule_boundaries():
    peak, total, warmup = 2e-4, 100, 3
    assert cosine_with_warmup(0, total, warmup, peak) == pytest.approx(peak / 3)  # first warmup step
    assert cosine_with_warmup(2, total, warmup, peak) == pytest.approx(peak)  # warmup ends at the peak
    assert cosine_with_warmup(3, total, warmup, peak) == pytest.approx(peak)  # decay starts at the peak
    midpoint = warmup + (total - warmup) / 2
    assert cosine_with_warmup(int(midpoint), total, warmup, peak) == pytest.approx(peak / 2, rel=0.02)
    assert cosine_with_warmup(total - 1, total, warmup, peak) < peak * 1e-3  # near zero at the end
    assert cosine_with_warmup(total, total, warmup, peak) == 0.0  # floor
    assert cosine_with_warmup(total + 5, total, warmup, peak) == 0.0
    values = [cosine_with_warmup(s, total, warmup, peak) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


@pytest.mark.parametrize(
    "examples, settings, expected",
    [
        (2550, dict(batch_size=2, grad_accum=8, epochs=2.0), (160, 320, 10)),  # the t4 run: last step of an epoch short
        (100, dict(batch_size=16, epochs=0.5), (7, 4, 1)),  # part of an epoch, rounded up; at least 1 warmup step
        (100, dict(batch_size=16, epochs=3.0, max_steps=5), (7, 5, 1)),  # --max-steps caps the total
    ],
)
def test_schedule_lengths(examples, settings, expected):
    assert schedule_lengths(examples, TrainConfig(**settings)) == expected
