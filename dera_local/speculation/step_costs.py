"""What one batched decode step costs, by how many rows it carries: the table the draft
length decides from (draft_length.DraftLength), kept by each BatchDecoder for all its
slots and generations.

The right draft length differs per machine (one more row costs ~0.05 of a step on a GPU,
0.4-0.6 on a 2-core CPU, more for the first extra row than for the next) and timings
are noisy, so the table is measured as it goes and made robust rather than assumed:

- the first timing of every shape is dropped: it carries one-off work (llama.cpp
  building and allocating the graph for a new batch size, cold caches) that, counted as
  the cost of a draft row, once made speculation switch itself off for a whole answer;
- each shape's cost is the median of its recent timings, so one slow step (another
  process waking up) moves nothing;
- from two rows on, costs are read off a line fitted to every measured shape, so a
  shape tried once is not judged on one timing, and shapes never tried are estimated
  from those that were (beyond them no steeper than a modest per-row cost, so that
  they get tried); before anything is measured, a prior.
"""

from __future__ import annotations

import statistics
from collections import Counter, deque


class StepCosts:
    WINDOW = 9  # recent timings kept per shape (the median of these is its cost)
    DROPPED_FIRST = 1  # timings dropped per shape (one-off work)
    # Before anything is measured: one more row costs this fraction of a one-row step
    # (about what a 2-core CPU shows; a GPU is far cheaper, and is measured soon).
    PRIOR_ROW_COST = 0.5
    # Beyond the largest measured shape, each row costs at most this fraction of a
    # one-row step (a little under what 2-core CPUs show past the first extra row).
    EXPLORED_ROW_COST = 0.35
    # A shape joins the line with this many kept timings (one timing of a far shape
    # would tilt it).
    LINE_TIMINGS = 2

    def __init__(self) -> None:
        self._timings: dict[int, deque[float]] = {}
        self._seen: Counter[int] = Counter()
        self._medians: dict[int, float] | None = None
        self._line_fit: tuple | None = None  # () when there is none

    @classmethod
    def known(cls, seconds_by_rows: dict[int, float]) -> StepCosts:
        """A table of costs already known (a measurement's, or a model's in tests)."""
        costs = cls()
        for rows, seconds in seconds_by_rows.items():
            costs._seen[rows] = cls.DROPPED_FIRST + 1
            costs._timings[rows] = deque([seconds], maxlen=cls.WINDOW)
        return costs

    def record(self, rows: int, seconds: float) -> None:
        """One decode step that carried `rows` rows (every sequence's tokens) took
        `seconds` (decoding, mixing and sampling; not drafting)."""
        if rows < 1 or not seconds > 0:
            return
        self._seen[rows] += 1
        if self._seen[rows] <= self.DROPPED_FIRST:
            return
        self._timings.setdefault(rows, deque(maxlen=self.WINDOW)).append(seconds)
        self._medians = self._line_fit = None

    def measured(self) -> dict[int, float]:
        """rows -> seconds: the median of each measured shape's kept timings."""
        if self._medians is None:
            self._medians = {
                rows: statistics.median(times) for rows, times in sorted(self._timings.items())
            }
        return self._medians

    def timings(self, rows: int) -> int:
        """How many kept timings the shape has (up to WINDOW)."""
        return len(self._timings.get(rows, ()))

    def seconds(self, rows: int) -> float:
        """The estimated cost of a step of `rows` rows. With nothing measured it is in
        units of a one-row step (only ratios matter to the decisions).

        One row is its own case (llama.cpp multiplies a vector, not a matrix: the first
        extra row costs the most). From two rows on, the cost is close to a line in the
        rows, fitted to every measured shape (weighted by its timings), so a shape tried
        once is not judged on that one timing, and the shapes between and around the
        measured ones are read off it."""
        known = self.measured()
        if not known:
            return self._prior(rows)
        plain = known.get(1) or known[min(known)] / self._prior(min(known))
        if rows == 1:
            return plain
        line = self._line()
        if line is not None:
            intercept, slope, widest = line
            if rows <= widest:
                return max(intercept + slope * rows, plain)
            # Beyond the widest shape tried: the line, but no steeper than a modest
            # per-row cost, because a shape is measured only once it is tried, and an
            # estimate too high would keep the draft length from ever trying it.
            edge = max(intercept + slope * widest, plain)
            return edge + self._explored_row_cost(plain, slope) * (rows - widest)
        # No line yet: what the few measured shapes say, between and beyond them.
        if rows in known:
            return known[rows]
        below = max((shape for shape in known if shape < rows), default=1)
        above = min((shape for shape in known if shape > rows), default=None)
        low = known.get(below, plain)
        if above is not None:
            return low + (known[above] - low) * (rows - below) / (above - below)
        return low + self._explored_row_cost(plain, None) * (rows - below)

    def _explored_row_cost(self, plain: float, slope: float | None) -> float:
        cap = self.EXPLORED_ROW_COST * plain
        return cap if slope is None else min(slope, cap)

    def _line(self) -> tuple[float, float, int] | None:
        """(intercept, slope, widest shape) of the least-squares line through the medians
        of the shapes of two rows or more (weighted by their timings); None until two
        such shapes have LINE_TIMINGS timings each."""
        if self._line_fit is None:
            points = [
                (rows, seconds, len(self._timings[rows]))
                for rows, seconds in self.measured().items()
                if rows >= 2 and len(self._timings[rows]) >= self.LINE_TIMINGS
            ]
            fit = _weighted_line(points)
            self._line_fit = () if fit is None else (*fit, max(x for x, _, _ in points))
        return self._line_fit or None

    def _prior(self, rows: int) -> float:
        return 1.0 + self.PRIOR_ROW_COST * (rows - 1)


def _weighted_line(points: list[tuple[int, float, float]]) -> tuple[float, float] | None:
    """(intercept, slope >= 0) of the weighted least-squares line through (x, y, weight)
    points; None with fewer than two distinct x."""
    if len({x for x, _, _ in points}) < 2:
        return None
    weight = sum(w for _, _, w in points)
    mean_x = sum(x * w for x, _, w in points) / weight
    mean_y = sum(y * w for _, y, w in points) / weight
    spread = sum(w * (x - mean_x) ** 2 for x, _, w in points)
    covariance = sum(w * (x - mean_x) * (y - mean_y) for x, y, w in points)
    slope = max(covariance / spread, 0.0)  # more rows never cost less
    return mean_y - slope * mean_x, slope
