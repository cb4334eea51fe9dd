"""A run's training loss, one point per step, kept to at most MAX_POINTS points however long
the run: a chart's worth, small enough to store in the run's row as it trains."""

from __future__ import annotations

MAX_POINTS = 256


class LossHistory:
    """Points [step, loss], each the mean loss over a stretch of `every` consecutive steps
    at the stretch's last step. When MAX_POINTS stretches are full, neighbours are merged in
    pairs and `every` doubles: the curve keeps its whole span at half the detail, so a run
    of any length has between MAX_POINTS / 2 and MAX_POINTS points (once it has that many
    steps), evenly spaced. The stretch in progress shows as the last point."""

    def __init__(self, points: list[list[float]] | None = None) -> None:
        """Continues a history saved by points() (a resumed run); steps after the one it
        resumes from are the caller's to drop. Its last point counts as a full stretch."""
        self._points: list[list[float]] = [[int(step), float(loss)] for step, loss in points or []]
        self._every = (
            max(1, int(self._points[-1][0] - self._points[-2][0])) if len(self._points) > 1 else 1
        )
        self._pending: list[float] = []

    def add(self, step: int, loss: float) -> bool:
        """Records one step's loss; True when it completed a stretch (a point that will
        not change any more: a good time to save the history)."""
        self._pending.append(loss)
        if len(self._pending) < self._every:
            return False
        self._points.append([step, sum(self._pending) / len(self._pending)])
        self._pending = []
        if len(self._points) > MAX_POINTS:
            self._merge_pairs()
        return True

    def points(self) -> list[list[float]]:
        """[[step, loss], ...], the stretch in progress last."""
        if not self._pending:
            return [list(point) for point in self._points]
        last_step = (self._points[-1][0] if self._points else 0) + len(self._pending)
        return [*map(list, self._points), [last_step, sum(self._pending) / len(self._pending)]]

    def _merge_pairs(self) -> None:
        # An odd point out (the oldest) stays as it is: its stretch is half as long.
        odd = len(self._points) % 2
        merged = self._points[:odd]
        for first, second in zip(self._points[odd::2], self._points[odd + 1 :: 2], strict=True):
            merged.append([second[0], (first[1] + second[1]) / 2])
        self._points = merged
        self._every *= 2
