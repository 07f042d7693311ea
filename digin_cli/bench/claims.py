"""Claims and confirmations as the bench reports them.

A row's runs are counted as a user's run counts them: what each record claims
(``claimed``) and whether the classifier judge confirms it (``confirmed``), both written by
the run itself, judged through ``--judge shapes:oracle-2`` as a user would judge, so the
bench measures the path users take. Beside it the geometric shape judge (no classifier,
the bench's own) confirms a claim where it applies. Precision is the share of claims
confirmed: what a user may trust of what digin presents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from digin_cli.bench.stats import format_rate, rate
from digin_cli.errors import DiginError

# The bench's classifier judge: trained apart from every guide (another seed and split of
# the shapes world), never in a loss. Each optimized row passes it to its jobs as --judge.
JUDGE = "shapes:oracle-2"
JUDGES = (JUDGE,)


def judge_view(record: dict[str, Any]) -> dict[str, Any]:
    """What the bench's judge saw in one record: top class and p(claimed) before and after, and `agrees`."""
    view = (record.get("judges") or {}).get(JUDGE)
    if view is None:
        raise DiginError(f"the record {record.get('item')} was not judged by {JUDGE}; the bench's jobs must pass --judge {JUDGE}")
    return view


def claim_counts(records: Sequence[dict[str, Any]], geometry: Sequence[bool] | None = None) -> dict[str, int]:
    """runs, claimed and confirmed over `records`, as the records state them; with
    `geometry` (per record: the geometric judge sees the claimed class) also
    confirmed_geometry, the claims the geometric judge confirms."""
    counts = {
        "runs": len(records),
        "claimed": sum(record.get("claimed") is True for record in records),
        "confirmed": sum(record.get("confirmed") is True for record in records),
    }
    if geometry is not None:
        counts["confirmed_geometry"] = sum(record.get("claimed") is True and bool(seen) for record, seen in zip(records, geometry))
    return counts


def add_counts(total: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    """Two count dicts of the same keys, summed."""
    return {key: total.get(key, 0) + value for key, value in counts.items()}


def claim_rates(counts: dict[str, int]) -> dict[str, dict]:
    """claimed and confirmed (of the runs), precision = confirmed / claimed, each with its
    Wilson 95% interval; the geometric judge's pair where it was counted."""
    rates = {
        "claimed": rate(counts["claimed"], counts["runs"]),
        "confirmed": rate(counts["confirmed"], counts["runs"]),
        "precision": rate(counts["confirmed"], counts["claimed"]),
    }
    if "confirmed_geometry" in counts:
        rates["confirmed_geometry"] = rate(counts["confirmed_geometry"], counts["runs"])
        rates["precision_geometry"] = rate(counts["confirmed_geometry"], counts["claimed"])
    return rates


def claim_headline(rates: dict[str, dict], claim: str, prefix: str = "") -> dict[str, str]:
    """The headline lines, in the order a reader follows them: what is claimed, what the
    judges confirm (of all runs), and what share of the claims that is."""
    lines = {
        f"{prefix}claimed: {claim}": format_rate(rates["claimed"]),
        f"{prefix}-> confirmed by {JUDGE} (--judge)": format_rate(rates["confirmed"]),
    }
    if "confirmed_geometry" in rates:
        lines[f"{prefix}-> confirmed by the shape judge (geometry)"] = format_rate(rates["confirmed_geometry"])
    lines[f"{prefix}-> precision = confirmed / claimed ({JUDGE})"] = format_rate(rates["precision"])
    if "precision_geometry" in rates:
        lines[f"{prefix}-> precision = confirmed / claimed (geometry)"] = format_rate(rates["precision_geometry"])
    return lines
