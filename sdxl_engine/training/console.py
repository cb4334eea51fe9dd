"""A run's steps on a console stream (the training worker's stderr, its log).

On a terminal, one tqdm bar that redraws in place: steps done of the run, the time per
step (or steps per second) and the loss of the last step. On anything else (a log file, a
pipe), a line at each tenth of the run and at its last step, never a line per step.
"""

from __future__ import annotations

import sys
import time
from typing import NoReturn, TextIO

from tqdm import tqdm

# A terminal's bar redraws at most this often: a fast run's thousands of steps cost no more.
_REDRAW_S = 0.5


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class StepProgress:
    """Reports the steps of one run of `total_steps` steps to `stream` (stderr if None)."""

    def __init__(self, total_steps: int, stream: TextIO | None = None, label: str = "training"):
        self._stream = stream if stream is not None else sys.stderr
        self._total, self._label = total_steps, label
        self._bar: tqdm[NoReturn] | None = None  # a bar without an iterable
        if _is_terminal(self._stream):
            self._bar = tqdm(
                total=total_steps,
                desc=label,
                unit="step",
                file=self._stream,
                mininterval=_REDRAW_S,
                dynamic_ncols=True,
            )
        self._started = time.monotonic()
        self._steps_before: int | None = None  # a resumed run starts part-way

    def step(self, step: int, loss: float) -> None:
        """Step `step` (counted from 1) has ended with `loss`."""
        if self._steps_before is None:
            self._steps_before = step - 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            self._bar.update(step - self._bar.n)
            return
        if self._tenth(step) == self._tenth(step - 1) and step != self._total:
            return
        per_step = (time.monotonic() - self._started) / max(step - self._steps_before, 1)
        self._stream.write(
            f"{self._label}: step {step}/{self._total} ({step * 100 // max(self._total, 1)}%), "
            f"loss {loss:.4f}, {per_step:.2f} s/step\n"
        )
        self._stream.flush()

    def _tenth(self, step: int) -> int:
        return step * 10 // max(self._total, 1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
