"""Charts drawn with Pillow: axes that fit their data, and a legend that hides no line."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from colorize import plots


def _steps(ticks: list[tuple[float, str]]) -> set[float]:
    values = [v for v, _ in ticks]
    return {round(b - a, 12) for a, b in zip(values, values[1:])}


@pytest.mark.parametrize("values", [[0.0] * 22 + [85.3, 630.0, 651.0, 0.0], [0.0123], [0.0, 0.0], [0.5, 0.5], [1 / x for x in range(1, 50)]],
                         ids=["throughput", "one-point", "all-zero", "constant", "falling"])
def test_an_axis_of_values_that_cannot_be_negative_does_not_go_below_zero(values: list[float]) -> None:
    """A throughput chart's axis ran to -42.66 images/s; a single loss of 0.0123 got -0.54 to 0.56."""
    ticks = plots.y_ticks(values)
    assert ticks[0][0] >= 0 and ticks[0][0] <= min(values) and ticks[-1][0] >= max(values), ticks


def test_ticks_are_round_steps_with_distinct_labels() -> None:
    """Five ticks of 3605.1-3605.3 read 3606, 3605, 3605, 3605, 3604."""
    for values in ([3605.2, 3605.1, 3605.3], [-6.1, 0.27, 5878.0], [2e-5, 3e-5], [1e9, 3e9]):
        ticks = plots.y_ticks(values)
        (step,) = _steps(ticks)
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5)), (values, step)
        labels = [label for _, label in ticks]
        assert len(set(labels)) == len(labels), (values, labels)
        assert ticks[0][0] <= min(values) and ticks[-1][0] >= max(values)


def test_negative_values_and_a_floor() -> None:
    assert plots.y_ticks([-3.0, 2.0])[0][0] <= -3.0
    assert plots.y_ticks([5.0, 7.0], ymin=0)[0] == (0.0, "0")


def test_the_legend_sits_outside_the_plot() -> None:
    """The legend was drawn over the lines at the top right: renaming the series changed the plot."""
    values = [[3.0, 3.0, 3.0, 3.0], [2.9, 2.95, 3.0, 3.0]]  # lines along the top, where the legend was
    short = np.asarray(plots.line_chart(dict(zip(["a", "b"], values)), title="t"))
    long = np.asarray(plots.line_chart(dict(zip(["train loss of a long name", "val loss"], values)), title="t"))
    rows = np.flatnonzero((short != long).any(axis=(1, 2)))
    assert rows.size and rows.max() < 50, rows  # only the legend's row, under the title, differs


@pytest.mark.parametrize("series", [{}, {"a": []}, {"a": [math.nan, math.inf]}, {"a": [1.0, math.nan, 3.0]},
                                    {f"series {i} with a name longer than most" * 2: [i, i + 1.0] for i in range(12)}],
                         ids=["none", "empty", "no-finite", "gap", "many-long"])
def test_odd_series_still_make_a_chart(series: dict) -> None:
    chart = plots.line_chart(series, title="a title " * 30, size=(640, 400))
    assert chart.size == (640, 400)


def test_a_grid_title_wider_than_its_column_is_cut_short_rather_than_drawn_over_the_next() -> None:
    images = np.zeros((2, 8, 8, 3), np.uint8)
    grid = np.asarray(plots.image_grid([("a title much wider than one cell", images), ("", images)], cell=64))
    assert (grid[:16, :64] != 255).any()  # the title is there, shortened
    assert (grid[:16, 64:] == 255).all()  # and the second column's header is untouched


@pytest.mark.parametrize("columns", [[], [("a", np.zeros((2, 8, 8, 3), np.uint8)), ("b", np.zeros((1, 8, 8, 3), np.uint8))]],
                         ids=["no-columns", "uneven"])
def test_a_grid_refuses_columns_it_cannot_lay_out(columns: list) -> None:
    """No columns was an IndexError; a shorter column left cells blank, a longer one lost its extra images."""
    with pytest.raises(ValueError, match="one or more columns of as many images each"):
        plots.image_grid(columns)


def _pixels_of(chart: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    return (np.asarray(chart) == colour).all(axis=-1)


def test_a_gap_in_a_series_is_left_open_with_the_points_either_side_drawn() -> None:
    drawn = _pixels_of(plots.line_chart({"a": [1.0, math.nan, 3.0]}, title="t", size=(640, 400)), plots._SERIES[0])
    drawn[:60] = False  # the legend's swatch, under the title
    columns = np.flatnonzero(drawn.any(axis=0))
    span = columns.max() - columns.min()
    assert span > 400  # a point at each end of the axis
    assert not ((columns > columns.min() + span / 4) & (columns < columns.max() - span / 4)).any()  # no line across the NaN


def test_twelve_series_draw_lines_in_all_ten_colours() -> None:
    series = {f"series {i} with a name longer than most" * 2: [i, i + 1.0] for i in range(12)}
    chart = plots.line_chart(series, title="t", size=(640, 400))
    # A line across the plot is hundreds of pixels; a legend swatch alone, a few dozen.
    assert all(_pixels_of(chart, colour).sum() > 200 for colour in plots._SERIES)
