"""`digin report DIR`: the pages of a run folder or of a bench folder, rebuilt from their records."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any
from urllib.parse import quote

from digin_cli.errors import DiginError
from digin_cli.io import read_json, read_jsonl, write_text
from digin_cli.report.legacy import SEED_RECORDS, read_legacy
from digin_cli.report.pages import CSS, write_run_page
from digin_cli.tasks.records import ITEM_FORMAT, RUN_FILE, SUMMARY_FILE



def read_run_folder(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """(header, records in input order) of a run folder, also an old one; None when it is none."""
    header = read_json(folder / RUN_FILE)
    if isinstance(header, dict) and "config" in header:
        names = [line["item"] for line in read_jsonl(folder / SUMMARY_FILE) if "item" in line]
        if not names:  # no summary yet: every record in the folder
            names = sorted(p.stem for p in folder.glob("*.json") if (read_json(p) or {}).get("format") == ITEM_FORMAT)
        records = [read_json(folder / f"{name}.json") for name in names]
        return header, [r for r in records if isinstance(r, dict)]
    return read_legacy(folder)


def build_report(folder: Path) -> list[Path]:
    """Write index.html for `folder` (a run folder, or a bench folder and every run below it); returns the pages."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiginError(f"{folder} is not a folder; give a run folder (with run.json) or a bench folder (with bench.json)")
    if (folder / "bench.json").is_file():
        pages = [page for run in run_folders(folder) for page in build_report(run)]
        return [*pages, write_bench_page(folder)]
    run = read_run_folder(folder)
    if run is None:
        raise DiginError(
            f"{folder} holds no digin run: no run.json, bench.json, {' or '.join(SEED_RECORDS)}, or item records; "
            "give the --out folder of a run"
        )
    header, records = run
    complete = header.get("complete", True) if not header.get("legacy") else True
    return [write_run_page(folder, header, records, complete)]


def run_folders(root: Path) -> list[Path]:
    """The run folders below `root` (old ones too), in path order."""
    found = {p.parent for p in root.rglob(RUN_FILE)} | {p.parent for name in SEED_RECORDS for p in root.rglob(name)}
    found |= {p.parent for p in root.rglob(SUMMARY_FILE)}
    return sorted(found)


def write_bench_page(folder: Path) -> Path:
    """The bench folder's page: the bench table, each row linking to the pages of its runs."""
    bench = read_json(folder / "bench.json") or {}
    names = (bench.get("config") or {}).get("rows") or []
    sections = []
    for name, row in zip(names, bench.get("rows") or []):
        figures = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in (row.get("headline") or {}).items()
        )
        links = " ".join(
            f'<a href="{quote(str(run.relative_to(folder)))}/index.html">{html.escape(str(run.relative_to(folder)))}</a>'
            for run in run_folders(folder / name)
        ) or "(no run folders)"
        criterion = html.escape(str(row.get("criterion", "")))
        sections.append(f"""<section class="row"><h2>{html.escape(str(row.get('row', name)))}</h2>
<table class="figures">{figures}<tr><th>time</th><td>{float(row.get('seconds', 0)):.0f} s</td></tr></table>
<p class="small">criterion: {criterion}</p><p>runs: {links}</p></section>""")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>digin bench</title><style>{CSS}
section.row{{margin:14px 20px;border:1px solid #dde1e7;border-radius:10px}} section.row a{{margin-right:10px}}</style></head>
<body><header><h1>digin bench</h1><p class="state">{html.escape(str(bench.get('benchmark', '')))} &middot;
{float(bench.get('seconds', 0)):.0f} s</p></header>
{''.join(sections)}
</body></html>
"""
    path = folder / "index.html"
    write_text(page, path)
    return path
