"""Figure layout shared by every heatmap over token positions: legible from 1 to 64+ tokens.

Up to `MAX_POSITION_COLUMNS` positions a heatmap shows positions as columns (tokens under the x axis);
beyond that it turns them into rows, so tokens read horizontally and the figure grows downwards instead
of becoming a ribbon several thousand pixels wide that a report must shrink until nothing can be read.
"""

from __future__ import annotations

MAX_POSITION_COLUMNS = 32
CELL_WIDTH_IN = 0.3  # one column of a heatmap (36 px at 120 dpi: room for a 7 pt rotated label)
CELL_HEIGHT_IN = 0.22  # one row


def positions_as_rows(n_positions: int) -> bool:
    """Whether a heatmap with `n_positions` token positions should put them on the rows."""
    return n_positions > MAX_POSITION_COLUMNS


def token_label(token: str, position: int | None = None) -> str:
    """A token as a tick label: escapes visible (newlines, leading spaces kept), position appended."""
    text = repr(token)[1:-1]
    return text if position is None else f"{text} ({position})"
