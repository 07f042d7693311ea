"""The benchmark's intervals: Wilson's score interval, checked by its definition."""

from __future__ import annotations

import math

import pytest

from digin_cli.bench.stats import Z_95, format_rate, rate, wilson_interval


@pytest.mark.parametrize(("successes", "runs"), [(0, 16), (3, 16), (10, 16), (16, 16), (44, 48), (1, 3)])
def test_wilson_endpoints_are_where_the_score_test_is_at_its_bound(successes, runs):
    """The interval is every p0 with |p - p0| <= z sqrt(p0 (1 - p0) / n): at each endpoint
    inside (0, 1) the two sides are equal, just inside it the test passes, just outside it fails."""
    p = successes / runs
    low, high = wilson_interval(successes, runs)
    assert 0 <= low <= p <= high <= 1

    def score(p0: float) -> float:
        return abs(p - p0) - Z_95 * math.sqrt(p0 * (1 - p0) / runs)

    for end, inward in ((low, 1e-6), (high, -1e-6)):
        if 0 < end < 1:
            assert abs(score(end)) < 1e-9
            assert score(end + inward) < 0 < score(end - inward)


def test_sixteen_of_sixteen_is_not_certainty():
    entry = rate(16, 16)
    assert entry["rate"] == 1.0 and entry["interval_95"][1] == 1.0 and 0.80 < entry["interval_95"][0] < 0.81
    assert format_rate(rate(10, 16)) == "62% (10/16, 95% CI 39-82%)"
