"""The HTML page of a run folder, `index.html`: one self-contained file (inline CSS, a little
inline script), images by relative path, no network request of any kind, so it opens from
file:// and from any static web server and the folder can be zipped and mailed.

At the top the run's command line and settings; then a grid of the items, each with its
images before and after, its classes, its figures before -> after and its outcome as a
badge, filterable by class and outcome and sortable; each item opens to its sheet, mask,
difference map and optimization plot. Failures are listed with their error. While a run
goes the page reloads itself every 15 s. A class scan (more than one class) opens on its
ranking of the classes (tasks/scan.py); a class's row filters the grid to its items.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from digin_cli.io import write_text
from digin_cli.tasks.records import flatten

# Per command: the figures a card shows (record key, label) and the images before / after.
FIGURES = {
    "disagree": [("p_f", "p_f"), ("p_g", "p_g")],
    "neuron": [("activation", "activation"), ("top_p", "top p")],
    "uvce": [("p_target", "p(target)"), ("p_source", "p(source)")],
    "neuron-cf": [("activation", "activation"), ("p_class", "p(class)")],
}
IMAGES = {
    "disagree": [("initial", "start"), ("optimized", "optimized")],
    "neuron": [("initial", "start"), ("optimized", "optimized")],
    "uvce": [("original", "original"), ("counterfactual", "counterfactual")],
    "neuron-cf": [("original", "original"), ("maximized", "maximized"), ("minimized", "minimized")],
}
DETAILS = [("sheet", "sheet"), ("mask", "mask"), ("difference", "difference"), ("plot", "optimization")]
DISAGREE_P_F, DISAGREE_P_G = 0.5, 0.2  # the bench's success rule, shown on disagree cards


def outcome(record: dict[str, Any], config: dict[str, Any]) -> tuple[str, str]:
    """The item's outcome as a badge: (text, kind), kind one of good, bad, neutral, failed."""
    if record.get("status") != "ok":
        return "failed", "failed"
    command, before, after = record["command"], record["before"], record["after"]
    if command == "disagree":
        yes = after["p_f"] >= DISAGREE_P_F and after["p_g"] <= DISAGREE_P_G
        return ("f sees it, g does not", "good") if yes else ("no disagreement", "neutral")
    if command == "neuron":
        raised = after["activation"] > before["activation"]
        wanted = config.get("mode", "maximize") == "maximize"
        text = "raised" if raised else "lowered" if after["activation"] < before["activation"] else "unchanged"
        return text, "good" if raised == wanted and text != "unchanged" else "neutral"
    if command == "uvce":
        if record.get("flipped") is None:  # a record from before the top-class rule (see legacy)
            return ("p(target) > p(source)", "good") if record.get("target_above_source") else ("not flipped", "neutral")
        return ("flipped", "good") if record["flipped"] else ("not flipped", "neutral")
    verdict, triggers = record.get("verdict"), record.get("from_other_class")
    if verdict:
        if verdict["flagged"]:
            return "spurious feature", "bad"
        return ("not flagged", "good") if verdict["object_kept"] else ("inconclusive", "neutral")
    if triggers:
        return ("triggers the class", "bad") if triggers["triggers_class"] else ("does not trigger the class", "good")
    return "done", "neutral"


def judging(record: dict[str, Any]) -> tuple[str, str, str] | None:
    """The judges' badge of a claimed item: (text, kind, filter value); None without judges
    or without a claim."""
    if record.get("status") != "ok" or record.get("confirmed") is None or not record.get("claimed"):
        return None
    agreeing, total = record.get("judges_agreeing", 0), len(record.get("judges") or {})
    text = f"confirmed by {agreeing} of {total} judge{'s' if total != 1 else ''}"
    return (text, "good", "confirmed") if record["confirmed"] else (text, "bad", "not confirmed")


def class_label(record: dict[str, Any]) -> str:
    classes = record.get("classes") or {}
    if "source" in classes or "target" in classes:
        return f"{classes.get('source', '?')} -> {classes.get('target', '?')}"
    if "class" in classes:
        return classes["class"]
    return str((record.get("after") or {}).get("top_class_name", ""))


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else html.escape(str(value))


def _img(name: str | None, alt: str, css: str = "") -> str:
    if not name:
        return ""
    return f'<img src="{quote(name)}" alt="{html.escape(alt)}" loading="lazy" class="{css}">'


def _figures_rows(record: dict[str, Any]) -> tuple[str, float]:
    """The card's figure table, and the change of its first figure (for sorting)."""
    command, before, after = record["command"], record.get("before") or {}, record.get("after") or {}
    afters = after if command == "neuron-cf" else {"after": after}
    head = "".join(f"<th>{html.escape(mode)}</th>" for mode in afters)
    rows, change = [], 0.0
    for key, label in FIGURES.get(command, []):
        if key not in before:
            continue
        cells = [f'<td class="num" data-key="{key}" data-when="before" data-value="{before[key]}">{_number(before[key])}</td>']
        for mode, figures in afters.items():
            if key in figures:
                cells.append(f'<td class="num" data-key="{key}" data-when="{mode}" data-value="{figures[key]}">'
                             f"{_number(figures[key])}</td>")  # fmt: skip
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
        if not change and afters:
            first = next(iter(afters.values()))
            if isinstance(first.get(key), (int, float)):
                change = float(first[key]) - float(before[key])
    table = f'<table class="figures"><tr><th></th><th>before</th>{head}</tr>{"".join(rows)}</table>'
    return table, change


def item_card(record: dict[str, Any], config: dict[str, Any], order: int) -> str:
    text, kind = outcome(record, config)
    label = class_label(record)
    judged = judging(record)
    judge_badge = f'<span class="badge {judged[1]}">{html.escape(judged[0])}</span>' if judged else ""
    judge_value = judged[2] if judged else ("not claimed" if record.get("confirmed") is not None else "")
    name = html.escape(record.get("item", ""))
    source = record.get("input") or {}
    where = f"seed {source['seed']}" if "seed" in source else html.escape(Path(str(source.get("file", ""))).name)
    files = record.get("files") or {}
    if record.get("status") != "ok":
        return (f'<article class="card failed" data-class="{html.escape(label)}" data-outcome="failed" data-order="{order}" '
                f'data-name="{name}" data-change="0"><h3>{name}</h3><p class="where">{where}</p>'
                f'<span class="badge failed">failed</span><p class="error">{html.escape(str(record.get("error")))}</p></article>')  # fmt: skip
    images = "".join(
        f"<figure>{_img(files.get(key), caption)}<figcaption>{caption}</figcaption></figure>"
        for key, caption in IMAGES.get(record["command"], []) if files.get(key)
    )  # fmt: skip
    table, change = _figures_rows(record)
    details = "".join(
        f"<figure>{_img(files[key], caption, 'wide' if key in ('sheet', 'plot') else '')}<figcaption>{caption}</figcaption></figure>"
        for key, caption in DETAILS if files.get(key)
    )  # fmt: skip
    verdict = (record.get("verdict") or {}).get("text")
    best = record.get("best_step")
    best_text = ", ".join(f"{k} {v}" for k, v in best.items()) if isinstance(best, dict) else str(best)
    return f"""<article class="card" data-class="{html.escape(label)}" data-outcome="{html.escape(text)}" data-order="{order}"
 data-name="{name}" data-change="{change:.6f}" data-judges="{judge_value}">
<h3>{name}</h3><p class="where">{where} &middot; <span class="cls">{html.escape(label)}</span></p>
<div class="badges"><span class="badge {kind}">{html.escape(text)}</span>{judge_badge}</div>
<div class="images">{images}</div>
{table}
<p class="small">kept step {html.escape(best_text)}{f" &middot; {html.escape(verdict)}" if verdict else ""}</p>
<details><summary>sheet, plot and record</summary><div class="details">{details}</div>
<p><a href="{quote(record.get('item', '') + '.json')}">record (JSON)</a></p></details>
</article>"""


def ranking_section(header: dict[str, Any]) -> str:
    """A class scan's ranking as the page's first view (empty for a run of one class): per
    class its rank, best image, counts, best margin and screening score; a row opens the class."""
    ranking = header.get("ranking") or []
    if len(ranking) < 2:
        return ""
    judged = bool((header.get("config") or {}).get("judges"))
    scan = header.get("scan") or {}
    screened = scan.get("screening") is not None
    heads = ["rank", "class", "best image", "items", "claimed", *(["confirmed"] if judged else []), "best p_f - p_g",
             *(["screen score"] if screened else [])]  # fmt: skip
    rows = []
    for entry in ranking:
        name = html.escape(entry["class"])
        items = str(entry["items"]) if entry["optimized"] else "screened out"
        cells = [str(entry["rank"]), f'<a href="#grid">{name}</a>', _img(entry.get("best_image"), f"best image of {entry['class']}", "thumb"),
                 items, str(entry["claimed"]), *([str(entry["confirmed"])] if judged else []),
                 "" if entry["best_margin"] is None else _number(entry["best_margin"]),
                 *([_number(entry["screen_score"])] if screened else [])]  # fmt: skip
        rows.append(f'<tr class="rank" data-class="{name}" data-rank="{entry["rank"]}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    chosen = f" &middot; screened {len(ranking)} classes by {scan.get('screen')} seeds, optimized the top {len(scan.get('chosen') or [])}" if screened else ""
    return f"""<section id="ranking"><h2>Classes, ranked{chosen}</h2>
<table class="ranking"><tr>{"".join(f"<th>{h}</th>" for h in heads)}</tr>{"".join(rows)}</table>
<p class="small">Ranked: {html.escape(str(scan.get("ranking_rule", "")))}. Open a class to see its items.</p></section>"""


def run_page(header: dict[str, Any], records: list[dict[str, Any]], complete: bool) -> str:
    """The page of a run folder from its header and its records (in input order)."""
    config = header.get("config") or {}
    command = header.get("command", "run")
    cards = "\n".join(item_card(record, config, order) for order, record in enumerate(records))
    counts = header.get("items") or {}
    failures = [r for r in records if r.get("status") != "ok"]
    failed_list = "".join(f"<li><b>{html.escape(r.get('item', ''))}</b>: {html.escape(str(r.get('error')))}</li>" for r in failures)
    # A scan's classes also where nothing of theirs is done (screened out): its rows filter by them.
    classes = sorted({class_label(r) for r in records} | {e["class"] for e in header.get("ranking") or []})
    outcomes = sorted({outcome(r, config)[0] for r in records})
    options = lambda values: "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)  # noqa: E731
    judges = config.get("judges") or []
    findings = ""
    if any("claimed" in r for r in records):  # counted from the records: the page may be rebuilt from them alone
        count = lambda key: sum(r.get("status") == "ok" and r.get(key) is True for r in records)  # noqa: E731
        findings = f" &middot; {count('claimed')} claimed"
        if judges:
            findings += f", {count('confirmed')} confirmed by {html.escape(', '.join(judges))}"
    judge_filter = ('<label>judges <select id="judges"><option value="">all</option>'
                    + options(["confirmed", "not confirmed", "not claimed"]) + "</select></label>") if judges else ""  # fmt: skip
    settings = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in flatten(config).items())
    versions = ", ".join(f"{k} {v}" for k, v in (header.get("versions") or {}).items())
    command_line = " ".join(header.get("command_line") or []) or f"digin {command} (command line not recorded)"
    refresh = "" if complete else '<meta http-equiv="refresh" content="15">'
    state = "complete" if complete else "running (this page reloads every 15 s)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
{refresh}<title>digin {html.escape(command)}: {html.escape(header.get('started', ''))}</title>
<style>{CSS}</style></head>
<body>
<header><h1>digin {html.escape(command)}</h1>
<p class="state">{state} &middot; {counts.get('done', 0)} done, {counts.get('failed', 0)} failed{findings} &middot;
started {html.escape(str(header.get('started', '')))} &middot; {float(header.get('seconds', 0.0)):.0f} s on {html.escape(str(header.get('device', '')))}
({html.escape(str(header.get('dtype', '')))})</p>
<pre class="command">{html.escape(command_line)}</pre>
<details><summary>settings</summary><table class="settings">{settings}</table><p class="small">{html.escape(versions)}</p></details>
</header>
{ranking_section(header)}
{f'<section class="failures"><h2>Failed</h2><ul>{failed_list}</ul></section>' if failures else ''}
<nav><label>class <select id="class"><option value="">all</option>{options(classes)}</select></label>
<label>outcome <select id="outcome"><option value="">all</option>{options(outcomes)}</select></label>
{judge_filter}
<label>sort <select id="sort"><option value="order">input order</option><option value="name">name</option>
<option value="change">change of the first figure</option></select></label> <span id="shown"></span></nav>
<main id="grid">
{cards}
</main>
<script>{SCRIPT}</script>
</body></html>
"""


def write_run_page(out: Path, header: dict[str, Any], records: list[dict[str, Any]], complete: bool) -> Path:
    path = Path(out) / "index.html"
    write_text(run_page(header, records, complete), path)
    return path


CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2230;background:#f5f6f8}
header,nav,section{padding:12px 20px;background:#fff;border-bottom:1px solid #dde1e7}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:0 0 6px} h3{font-size:14px;margin:0;word-break:break-all}
.state,.small,.where{color:#5b6475;margin:2px 0} .small{font-size:12px}
pre.command{white-space:pre-wrap;word-break:break-all;background:#f0f2f5;padding:8px;border-radius:6px;font-size:12px}
table.settings{border-collapse:collapse;font-size:12px} table.settings th{text-align:left;padding:1px 10px 1px 0;color:#5b6475;font-weight:500}
nav{display:flex;flex-wrap:wrap;gap:12px;align-items:center;position:sticky;top:0;z-index:1}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:14px;padding:16px 20px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:10px;padding:12px;display:flex;flex-direction:column;gap:6px}
.card.failed{border-color:#d93b3b}
.images{display:flex;gap:6px} figure{margin:0;flex:1;min-width:0} figure img{width:100%;image-rendering:pixelated;border-radius:4px;display:block}
figcaption{font-size:11px;color:#5b6475;text-align:center}
.badges{display:flex;flex-wrap:wrap;gap:6px}
.badge{align-self:flex-start;border-radius:999px;padding:2px 10px;font-size:12px;font-weight:600}
.badge.good{background:#dcf5e3;color:#17632f} .badge.bad{background:#fde2e2;color:#9c1c1c}
.badge.neutral{background:#e8ebf0;color:#3b4354} .badge.failed{background:#d93b3b;color:#fff}
table.figures{border-collapse:collapse;font-size:13px} table.figures th,table.figures td{padding:1px 8px 1px 0;text-align:left}
td.num{font-variant-numeric:tabular-nums}
.error{color:#9c1c1c;word-break:break-word}
.details{display:flex;flex-direction:column;gap:8px} .details img.wide{image-rendering:auto}
#ranking{overflow-x:auto} table.ranking{border-collapse:collapse;font-size:13px}
table.ranking th,table.ranking td{padding:3px 10px 3px 0;text-align:left;vertical-align:middle}
tr.rank{cursor:pointer} tr.rank:hover{background:#f0f2f5} tr.rank.open{background:#e3ecfb}
img.thumb{width:48px;height:48px;image-rendering:pixelated;border-radius:4px;display:block}
"""

SCRIPT = """
(function(){
  const grid=document.getElementById('grid'), cards=[...grid.querySelectorAll('.card')];
  const pick=id=>document.getElementById(id);
  function update(){
    const cls=pick('class').value, out=pick('outcome').value, sort=pick('sort').value;
    const jud=pick('judges')?pick('judges').value:'';
    const key=c=>sort==='name'?c.dataset.name:sort==='change'?-parseFloat(c.dataset.change):parseInt(c.dataset.order);
    cards.sort((a,b)=>{const x=key(a),y=key(b);return x<y?-1:x>y?1:0;});
    let shown=0;
    for(const c of cards){const ok=(!cls||c.dataset.class===cls)&&(!out||c.dataset.outcome===out)&&(!jud||c.dataset.judges===jud);
      c.style.display=ok?'':'none'; shown+=ok; grid.appendChild(c);}
    pick('shown').textContent=shown+' of '+cards.length+' items';
  }
  ['class','outcome','sort','judges'].forEach(id=>pick(id)&&pick(id).addEventListener('change',update)); update();
  // A scan's ranking: a class's row opens it, i.e. filters the grid to its items.
  for(const row of document.querySelectorAll('tr.rank')){
    row.addEventListener('click',e=>{e.preventDefault(); pick('class').value=row.dataset.class; update();
      document.querySelectorAll('tr.rank').forEach(r=>r.classList.toggle('open',r===row)); grid.scrollIntoView();});
  }
})();
"""
