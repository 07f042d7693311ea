"""Run folders written before the record format (digin 0.1 up to the run records): read
into the header and records the pages take, as far as their records allow.

- `disagree` and `neuron` wrote one `disagree.json` / `neuron.json`: the header and an
  `images` list with `initial` / `optimized` figures.
- `uvce` and `neuron-cf` wrote one JSON per item with `original`, `p2p_start`,
  `counterfactual` (uvce) or `maximized` / `minimized` (neuron-cf), and the config in
  every item; their `flipped` meant p(target) > p(source), kept as `target_above_source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from digin_cli.io import read_json

SEED_RECORDS = ("disagree.json", "neuron.json")


def read_legacy(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """(header, records) of an old run folder, or None when it is not one."""
    for name in SEED_RECORDS:
        record = read_json(folder / name)
        if isinstance(record, dict) and isinstance(record.get("images"), list):
            return _seed_run(record)
    items = [(path, read_json(path)) for path in sorted(folder.glob("*.json"))]
    items = [(p, r) for p, r in items if isinstance(r, dict) and r.get("command") in ("uvce", "neuron-cf") and "format" not in r]
    if not items:
        return None
    first = items[0][1]
    header = _header(first["command"], first.get("config") or {}, first.get("versions") or {}, len(items))
    convert = _uvce_item if first["command"] == "uvce" else _neuron_cf_item
    return header, [convert(path.stem, record) for path, record in items]


def _header(command: str, config: dict[str, Any], versions: dict[str, str], done: int, **extra: Any) -> dict[str, Any]:
    return {"command": command, "command_line": None, "versions": versions, "device": extra.get("device", ""),
            "dtype": config.get("dtype", ""), "config": config, "started": extra.get("started", ""),
            "seconds": extra.get("seconds", 0.0), "items": {"done": done, "failed": 0}, "legacy": True}  # fmt: skip


def _seed_run(record: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    command, config = record.get("command", "disagree"), record.get("config") or {}
    header = _header(command, config, record.get("versions") or {}, len(record["images"]), device=record.get("device", ""),
                     started=record.get("started", ""), seconds=record.get("seconds", 0.0))  # fmt: skip
    classes = {"class": config["class_name"]} if "class_name" in config else {}
    records = [
        {"command": command, "item": image["files"]["initial"].removesuffix("_init.png"), "input": {"seed": image["seed"]},
         "status": "ok", "error": None, "classes": classes, "before": image["initial"], "after": image["optimized"],
         "best_step": image.get("best_step"), "files": image["files"], "seconds": image.get("seconds", 0.0),
         "history": image.get("history", [])}
        for image in record["images"]
    ]  # fmt: skip
    return header, records


def _uvce_item(item: str, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": "uvce", "item": item, "input": {"file": record.get("file", "")}, "status": "ok", "error": None,
        "classes": {"source": record.get("source_class", "?"), "target": record.get("target_class", "?")},
        "before": record.get("original", {}), "after": record.get("counterfactual", {}), "start": record.get("p2p_start", {}),
        "best_step": record.get("best_step"), "files": record.get("files", {}), "seconds": record.get("seconds", 0.0),
        "flipped": None, "target_above_source": record.get("flipped"), "history": record.get("history", []),
    }  # fmt: skip


def _neuron_cf_item(item: str, record: dict[str, Any]) -> dict[str, Any]:
    modes = [mode for mode in ("maximized", "minimized") if mode in record]
    strip = lambda figures: {k: v for k, v in figures.items() if k not in ("start", "best_step")}  # noqa: E731
    return {
        "command": "neuron-cf", "item": item, "input": {"file": record.get("file", "")}, "status": "ok", "error": None,
        "classes": {"class": record.get("class_name", "?")}, "before": record.get("original", {}),
        "after": {mode: strip(record[mode]) for mode in modes}, "best_step": {mode: record[mode].get("best_step") for mode in modes},
        "files": record.get("files", {}), "seconds": record.get("seconds", 0.0), "verdict": record.get("verdict"),
        "from_other_class": record.get("from_other_class"), "history": {},
    }  # fmt: skip
