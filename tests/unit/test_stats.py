"""The project's one percentile definition: nearest rank, the ceil(q/100 * n)-th smallest value."""

from __future__ import annotations

import numpy as np
import pytest

from imgsearch.stats import percentile, percentiles


@pytest.mark.parametrize(("q", "expected"), [
    (0, 15.0),  # rank max(1, 0) = 1
    (5, 15.0),  # ceil(0.25) = 1st
    (30, 20.0),  # ceil(1.5) = 2nd
    (40, 20.0),  # 2.0 exactly: the 2nd, not the 3rd
    (50, 35.0),  # ceil(2.5) = 3rd
    (80, 40.0),  # 4.0 exactly
    (81, 50.0),  # ceil(4.05) = 5th
    (100, 50.0),
])
def test_five_values(q, expected):
    assert percentile([40, 15, 50, 35, 20], q) == expected  # unsorted on purpose


def test_ten_values_quartiles():
    xs = [3, 6, 7, 8, 8, 10, 13, 15, 16, 20]
    # ranks ceil(2.5) = 3, 5, ceil(7.5) = 8, 10
    assert percentiles(xs, [25, 50, 75, 100]) == [7.0, 8.0, 15.0, 20.0]


def test_an_observed_value_never_an_interpolated_one():
    xs = list(range(1, 101))  # 1..100: linear interpolation would give 99.01 for p99 and 50.5 for p50
    assert percentiles(xs, [50, 99, 99.5]) == [50.0, 99.0, 100.0]


def test_decimal_q_is_exact():
    # 99.9 / 100 * 1000 is 999.0000000000001 in floats: the 999th value, not the 1000th
    assert percentile(np.arange(1.0, 1001.0), 99.9) == 999.0
    assert percentile(np.arange(1.0, 1001.0), np.float64(99.9)) == 999.0


def test_agrees_with_numpys_inverted_cdf():
    xs = np.random.default_rng(3).lognormal(size=997)
    qs = [1, 10, 50, 90, 95, 99, 99.9]
    assert percentiles(xs, qs) == [float(v) for v in np.percentile(xs, qs, method="inverted_cdf")]


def test_any_iterable_and_one_value():
    assert percentile((x for x in [2.0, 1.0]), 50) == 1.0
    assert percentiles([7.5], [0, 50, 100]) == [7.5, 7.5, 7.5]


def test_empty_is_none_and_q_outside_0_100_is_refused():
    assert percentiles([], [50, 99]) == [None, None]
    assert percentile(np.array([]), 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 100.5)
    with pytest.raises(ValueError):
        percentile([1.0], -1)
