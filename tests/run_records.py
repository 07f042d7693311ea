"""Reading a run folder in tests, every record checked against the shipped JSON Schemas."""

from __future__ import annotations

from pathlib import Path


def read_run(out: Path) -> tuple[dict, list[dict]]:
    """A run folder as its readers see it: the header and the summary's records, each checked
    against the shipped JSON Schemas (the per-item record files too)."""
    import json

    import jsonschema

    from digin_cli.schemas import load_schema

    header = json.loads((out / "run.json").read_text())
    jsonschema.validate(header, load_schema("run"))
    item_schema = load_schema("item")
    lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    for line in lines:
        jsonschema.validate(line, item_schema)
        record = json.loads((out / f"{line['item']}.json").read_text())
        jsonschema.validate(record, item_schema)
        assert {k: v for k, v in record.items() if k != "history"} == line, "the summary line is the record without its history"
    return header, lines


def read_record(out: Path, item: str) -> dict:
    import json

    return json.loads((out / f"{item}.json").read_text())
