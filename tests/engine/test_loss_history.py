"""A run's loss history keeps its whole span in at most MAX_POINTS points."""

import pytest

from sdxl_engine.loss_history import MAX_POINTS, LossHistory


def test_a_long_run_keeps_its_span_in_at_most_max_points_of_stretch_means() -> None:
    history = LossHistory()
    completed = [history.add(step, float(step)) for step in range(1, 10_001)]
    points = history.points()
    assert MAX_POINTS // 2 <= len(points) <= MAX_POINTS
    assert points[0] == [1, 1.0] and points[-1][0] == 10_000  # the whole span
    assert [step for step, _ in points] == sorted(step for step, _ in points)
    # Each point is its stretch's mean: steps 2..65 average 33.5.
    assert points[1] == [65, 33.5]
    assert sum(completed) < 1_000  # a point completes every `every` steps, not each step


def test_a_resumed_history_continues_at_its_spacing() -> None:
    history = LossHistory()
    for step in range(1, 1001):
        history.add(step, 1.0)
    saved = history.points()
    resumed = LossHistory([point for point in saved if point[0] <= 600])
    for step in range(601, 1001):
        resumed.add(step, 1.0)
    assert resumed.points()[-1][0] == 1000
    assert len(resumed.points()) == pytest.approx(len(saved), abs=2)
