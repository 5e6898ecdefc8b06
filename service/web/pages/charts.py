"""Charts as data for inline SVG: pure geometry, no I/O (the template draws the shapes).

Every chart is a list of horizontal bars with a label and a value, so the SVG reads the
same without JavaScript, to a screen reader (each bar has a <title>) and to a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 720
LABEL_WIDTH = 200
VALUE_WIDTH = 90
ROW_HEIGHT = 24
BAR_HEIGHT = 16
MAX_BINS = 20


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    text: str  # the value as shown
    y: int
    width: float


@dataclass(frozen=True)
class Chart:
    title: str
    description: str
    value_name: str
    bars: list[Bar]
    width: int = WIDTH
    label_width: int = LABEL_WIDTH
    bar_height: int = BAR_HEIGHT

    @property
    def height(self) -> int:
        return max(1, len(self.bars)) * ROW_HEIGHT + 8

    @property
    def bar_x(self) -> int:
        return self.label_width + 8


def bar_chart(
    title: str, description: str, value_name: str, items: Sequence[tuple[str, float, str]]
) -> Chart:
    """Bars scaled to the largest value; ``items`` are (label, value, shown text)."""
    largest = max((value for _, value, _ in items), default=0) or 1
    room = WIDTH - LABEL_WIDTH - VALUE_WIDTH - 16
    bars = [
        Bar(label, value, text, i * ROW_HEIGHT + 4, round(room * value / largest, 1))
        for i, (label, value, text) in enumerate(items)
    ]
    return Chart(title, description, value_name, bars)


def histogram_bins(counts: Sequence[tuple[int, int]]) -> list[tuple[str, int]]:
    """(experiments, users) pairs into at most MAX_BINS bins of equal width, labelled.

    Few distinct counts get a bin each; more get ranges over 0..max, so a long tail
    does not make hundreds of bars.
    """
    if not counts:
        return []
    top = max(value for value, _ in counts)
    if top < MAX_BINS:
        users = dict(counts)
        return [(str(value), users.get(value, 0)) for value in range(top + 1)]
    width = -(-(top + 1) // MAX_BINS)  # ceiling division
    bins = [0] * -(-(top + 1) // width)
    for value, users_in in counts:
        bins[value // width] += users_in
    return [
        (f"{i * width} to {min(top, (i + 1) * width - 1)}", users_in)
        for i, users_in in enumerate(bins)
    ]
