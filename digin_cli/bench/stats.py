"""How sure a benchmark rate is: the 95% Wilson score interval of k successes in n runs.

Wilson's interval (Wilson 1927; Brown, Cai and DasGupta 2001 recommend it for small n)
stays inside [0, 1] and is not degenerate at 0 or n successes, unlike the normal
approximation: 16 of 16 gives [0.806, 1], not [1, 1].
"""

from __future__ import annotations

import math

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, runs: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval; (0, 1) for no runs."""
    if runs == 0:
        return 0.0, 1.0
    p = successes / runs
    denominator = 1 + z * z / runs
    centre = (p + z * z / (2 * runs)) / denominator
    half = z * math.sqrt(p * (1 - p) / runs + z * z / (4 * runs * runs)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: int, runs: int) -> dict:
    """A headline rate as bench.json states it: the share, its runs and its 95% interval."""
    low, high = wilson_interval(successes, runs)
    return {"rate": round(successes / runs, 4) if runs else None, "successes": successes, "runs": runs,
            "interval_95": [round(low, 4), round(high, 4)]}  # fmt: skip


def format_rate(entry: dict) -> str:
    """'62% (10/16, 95% CI 39-82%)'."""
    if not entry["runs"]:
        return "- (0 runs)"
    low, high = entry["interval_95"]
    return f"{entry['rate']:.0%} ({entry['successes']}/{entry['runs']}, 95% CI {100 * low:.0f}-{high:.0%})"
