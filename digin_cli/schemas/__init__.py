"""The JSON Schemas of digin's run records: ``run.schema.json`` (run.json) and
``item.schema.json`` (each <item>.json, and each line of summary.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parent


def load_schema(name: str) -> dict[str, Any]:
    """`run` or `item`."""
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
