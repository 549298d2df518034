"""The overview's chart: completed and failed records per minute over the last hour, as
the geometry of an inline SVG drawn on the server (no script, no chart library). The
counts come from the store's `minutes` table, one row per minute."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

MINUTES = 60
# Drawn at two sizes, shown by width (CSS), so that its labels stay readable on a phone:
WIDE, NARROW = (960, 210, 5), (360, 200, 3)  # width, height, time labels
RECENT = 5  # minutes of "completed lately", the current one included
LEFT, RIGHT, TOP, BOTTOM = 46, 8, 12, 24  # room for the axis labels
GAP = 2.0  # between bars
MIN_FAILED_PX = 3.0  # a minute with failures always shows them, however few


@dataclass(frozen=True)
class Bar:
    """One minute: completed stacked under failed."""

    x: float
    width: float
    completed_y: float
    completed_height: float
    failed_y: float
    failed_height: float
    label: str  # HH:MM (UTC)
    completed: int
    failed: int


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    y_ticks: list[tuple[float, str]]  # (y, count)
    x_ticks: list[tuple[float, str, str]]  # (x, HH:MM, text-anchor)
    completed: int  # over the hour
    failed: int
    recent: int  # completed in the last RECENT minutes
    recent_s: float  # how long that is, up to now
    width: int
    height: int
    left: int = LEFT

    @property
    def bottom(self) -> int:
        return self.height - BOTTOM

    @property
    def per_second(self) -> float:
        """Completed per second, lately."""
        return self.recent / self.recent_s


def _count(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def nice_ceiling(value: int) -> int:
    """The smallest of 10, 20, 25, 50, 100, 200, 250, 500, ... at or above `value`."""
    scale = 10
    while True:
        for top in (scale, 2 * scale, scale * 5 // 2, 5 * scale):
            if top >= value:
                return top
        scale *= 10


def hour_chart(
    rows: list[tuple[str, int, int]], now: datetime, size: tuple[int, int, int] = WIDE
) -> Chart:
    """The chart of the hour up to `now` (UTC) from (minute, completed, failed) rows,
    drawn `size` (width, height, time labels)."""
    width, height, labels = size
    current = now.replace(second=0, microsecond=0)
    minutes = [current - timedelta(minutes=MINUTES - 1 - i) for i in range(MINUTES)]
    counted = {minute: (done, failed) for minute, done, failed in rows}
    counts = [counted.get(m.strftime("%Y-%m-%dT%H:%M"), (0, 0)) for m in minutes]
    top = nice_ceiling(max(done + failed for done, failed in counts))
    plot_height = height - TOP - BOTTOM
    slot = (width - LEFT - RIGHT) / MINUTES
    bottom = height - BOTTOM
    bars = []
    for i, (minute, (done, failed)) in enumerate(zip(minutes, counts, strict=True)):
        done_h = plot_height * done / top
        failed_h = max(plot_height * failed / top, MIN_FAILED_PX) if failed else 0.0
        x = LEFT + i * slot + GAP / 2
        bars.append(
            Bar(
                x=round(x, 2),
                width=round(slot - GAP, 2),
                completed_y=round(bottom - done_h, 2),
                completed_height=round(done_h, 2),
                failed_y=round(bottom - done_h - failed_h, 2),
                failed_height=round(failed_h, 2),
                label=minute.strftime("%H:%M"),
                completed=done,
                failed=failed,
            )
        )
    y_ticks = [(round(bottom - plot_height * f, 2), _count(top * f)) for f in (0, 0.5, 1)]
    at = [round(i * (MINUTES - 1) / (labels - 1)) for i in range(labels)]
    anchors = {at[0]: "start", at[-1]: "end"}
    x_ticks = [
        (round(LEFT + i * slot + slot / 2, 2), bars[i].label, anchors.get(i, "middle")) for i in at
    ]
    into_minute = now.second + now.microsecond / 1e6
    return Chart(
        bars=bars,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        completed=sum(done for done, _ in counts),
        failed=sum(failed for _, failed in counts),
        recent=sum(done for done, _ in counts[-RECENT:]),
        recent_s=(RECENT - 1) * 60 + max(into_minute, 1.0),
        width=width,
        height=height,
    )
