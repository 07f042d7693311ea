"""A class scan: `digin disagree` over many classes, a cheap screen first, and a ranking of the classes.

A scan is a disagree run over several classes (``--class`` repeated, ``--classes FILE``, or
``--class all``: every class of f). Its items are (class, seed) pairs, each named
``<class>_seed<S>`` as a one-class run names its seeds, with the same resume rules.

**The screen** (``--screen K --top N``): before anything is optimized, every class is scored
by the unoptimized samples of K seeds, the run's first seeds (``--seed`` .. ``--seed + K - 1``),
so the screened images are the very starts the optimization later begins from (the engine's
``start_report`` is iterate 0 of ``optimize``). The score is the mean of p_f - p_g over the K
plain images: one batched forward sampling pass per class, no gradient. Only the N classes
with the highest score are optimized. The figures go to ``screen.json`` as each class is
screened, so a rerun screens nothing twice.

**The ranking** is RANKING_RULE (see ``rank_classes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from digin_cli.engine import GuidedDDIM, SamplerConfig, StepReport, initial_latents
from digin_cli.errors import DiginError
from digin_cli.io import read_lines
from digin_cli.models import Classifier, resolve_class
from digin_cli.objectives import Disagreement
from digin_cli.tasks.records import RunFolder
from digin_cli.tasks.runtime import Progress, slug

ALL_CLASSES = "all"  # --class all: the whole label space of f
RANKING_RULE = (
    "classes that were optimized first, ranked by confirmed findings (when judged), then claimed findings, "
    "then the best margin (p_f - p_g of the class's best image), all descending; classes the screen left out "
    "follow, by their screening score (mean p_f - p_g of the unoptimized samples), descending"
)


@dataclass(frozen=True)
class ClassRequest:
    """One class as the user named it, and where, for the errors."""

    text: str  # a class name or an index
    where: str  # "--class", or "--classes FILE line N"


@dataclass(frozen=True)
class ScanClass:
    """One class of a scan in f's label space."""

    index: int
    name: str
    prompt: str
    stem: str  # its items' file prefix: the class slug, with the index where two classes share a slug

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "prompt": self.prompt}


def requested_classes(names: str | Sequence[str], classes_file: Path | None) -> list[ClassRequest] | str:
    """The classes asked for (checked before anything loads), or ALL_CLASSES.
    `--classes FILE`: one name or index a line; blank lines and `#` comments are skipped."""
    names = [names] if isinstance(names, str) else list(names or [])
    if ALL_CLASSES in names:
        if len(names) > 1 or classes_file is not None:
            raise DiginError("--class all names every class of f; give it alone, without other --class or --classes")
        return ALL_CLASSES
    requests = [ClassRequest(name, "--class") for name in names]
    if classes_file is not None:
        requests += _file_requests(Path(classes_file))
    if not requests:
        raise DiginError("no class given; name one with --class NAME (repeatable), every class with --class all, "
                         "or a file of them with --classes FILE")  # fmt: skip
    return requests


def _file_requests(path: Path) -> list[ClassRequest]:
    try:
        lines = read_lines(path)
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "not a UTF-8 text file"
        raise DiginError(f"--classes {path} cannot be read ({reason}); give a text file of class names, one a line") from None
    requests = [ClassRequest(line.split("#", 1)[0].strip(), f"--classes {path} line {number}")
                for number, line in enumerate(lines, start=1)]  # fmt: skip
    requests = [request for request in requests if request.text]
    if not requests:
        raise DiginError(f"--classes {path} names no class; write one class name or index a line "
                         "(blank lines and # comments are skipped)")  # fmt: skip
    return requests


def check_scan_options(screen: int | None, top: int | None) -> None:
    """--screen and --top, before anything loads."""
    if screen is not None and screen < 1:
        raise DiginError(f"--screen must be at least 1 (seeds per class scored before optimizing), got {screen}")
    if top is not None and top < 1:
        raise DiginError(f"--top must be at least 1 (classes optimized after the screen), got {top}")
    if top is not None and screen is None:
        raise DiginError("--top needs --screen K: the top classes are those the screen scores highest")
    if screen is not None and top is None:
        raise DiginError("--screen needs --top N: how many of the classes it scores highest to optimize")


def resolve_classes(f: Classifier, requested: list[ClassRequest] | str, prompt_template: str) -> list[ScanClass]:
    """The requested classes in f's label space, each once, in the order given (all: f's order)."""
    if requested == ALL_CLASSES:
        indices = list(range(f.num_classes))
    else:
        indices = []
        for request in requested:
            try:
                indices.append(resolve_class(f, request.text))
            except DiginError as error:  # a file line is named; a --class value names itself
                raise DiginError(f"{request.where}: {error}" if request.where != "--class" else str(error)) from None
    indices = list(dict.fromkeys(indices))
    slugs = [slug(f.class_names[index]) for index in indices]
    return [ScanClass(index, f.class_names[index], prompt_template.format(f.class_names[index]),
                      stem if slugs.count(stem) == 1 else f"{stem}-{index}")  # ImageNet has two 'crane's
            for index, stem in zip(indices, slugs)]  # fmt: skip


# -- the screen -----------------------------------------------------------------------------


@torch.no_grad()
def screen_class(engine: GuidedDDIM, objective: Disagreement, prompt: str, seeds: list[int],
                 sampler: SamplerConfig) -> dict[str, Any]:  # fmt: skip
    """One class's screening entry: p_f and p_g of the unoptimized sample of every seed (the
    optimization's iterate 0), and their mean difference, its score."""
    batch = len(seeds)
    prompt_emb = engine.encode_text([prompt]).expand(batch, -1, -1)  # (1, L, D) -> (K, L, D)
    null_emb = engine.null_embedding().expand(batch, -1, -1)  # (1, L, D) -> (K, L, D)
    report = engine.start_report(objective, initial_latents(engine.components, seeds), prompt_emb, null_emb, sampler)
    p_f, p_g = report.metrics["p_f"].float().cpu(), report.metrics["p_g"].float().cpu()  # (K,), (K,)
    return {"class_index": objective.class_index, "seeds": list(seeds), "p_f": [round(float(v), 6) for v in p_f],
            "p_g": [round(float(v), 6) for v in p_g], "score": round(float((p_f - p_g).mean()), 6)}  # fmt: skip


def screen_classes(engine: GuidedDDIM, f: Classifier, g: Classifier, classes: list[ScanClass], seeds: list[int],
                   sampler: SamplerConfig, folder: RunFolder, progress: Progress) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Every class's screening entry (by class index): those stored for these seeds are read
    back, the others computed and stored one class at a time (a kill loses one class at most)."""
    stored = {int(key): entry for key, entry in folder.screened().items() if entry.get("seeds") == list(seeds)}
    pending = [cls for cls in classes if cls.index not in stored]
    if pending:
        progress.start(f"screening {len(pending)} classes", len(pending))
    for done, cls in enumerate(pending, start=1):
        entry = screen_class(engine, Disagreement(f, g, cls.index), cls.prompt, seeds, sampler)
        folder.write_screened(str(cls.index), entry)
        stored[cls.index] = entry
        progress.step(StepReport(step=done, total=len(pending), loss=torch.zeros(0), metrics={}))
    if pending:
        progress.finish()
    return {cls.index: stored[cls.index] for cls in classes}


def chosen_classes(classes: list[ScanClass], screening: dict[int, dict[str, Any]] | None, top: int | None) -> list[ScanClass]:
    """The classes to optimize, in the order given: all of them, or the `top` the screen scores
    highest (ties: the lower class index)."""
    if screening is None or top is None:
        return list(classes)
    ranked = sorted(classes, key=lambda cls: (-screening[cls.index]["score"], cls.index))
    keep = {cls.index for cls in ranked[:top]}
    return [cls for cls in classes if cls.index in keep]


# -- the ranking ----------------------------------------------------------------------------


def margin(record: dict[str, Any]) -> float:
    """What the optimization raised: p_f - p_g of the kept image."""
    return float(record["after"]["p_f"]) - float(record["after"]["p_g"])


def class_entry(cls: ScanClass, records: list[dict[str, Any]], judged: bool, optimized: bool,
                screening: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """One class's line of the ranking: its counts, its best image and its screening score.
    The best image is the claimed one with the highest p_f - p_g, else the highest of all."""
    done = [r for r in records if r.get("status") == "ok"]
    claimed = [r for r in done if r.get("claimed") is True]
    best = max(claimed or done, key=margin, default=None)
    return {
        "class": cls.name,
        "class_index": cls.index,
        "optimized": optimized,
        "items": len(done),
        "failed": sum(r.get("status") == "failed" for r in records),
        "claimed": len(claimed),
        "confirmed": sum(r.get("confirmed") is True for r in done) if judged else None,
        "best_item": best["item"] if best else None,
        "best_image": best["files"].get("optimized") if best else None,
        "best_margin": round(margin(best), 6) if best else None,
        "best_claimed": best is not None and best.get("claimed") is True,
        "screen_score": screening["score"] if screening else None,
    }


def rank_key(entry: dict[str, Any]) -> tuple:
    """RANKING_RULE as a sort key (ascending); the class index breaks the last ties."""
    if not entry["optimized"]:
        return (1, -(entry["screen_score"] or 0.0), entry["class_index"])
    best = entry["best_margin"] if entry["best_margin"] is not None else float("-inf")
    return (0, -(entry["confirmed"] or 0), -entry["claimed"], -best, entry["class_index"])


def rank_classes(classes: list[ScanClass], chosen: list[ScanClass], records: list[dict[str, Any]],
                 screening: dict[int, dict[str, Any]] | None, judged: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Every class once, ranked by RANKING_RULE: the classes optimized first, by confirmed
    findings (when judged), then claimed findings, then the best margin p_f - p_g, all
    descending; then the classes the screen left out, by their screening score, descending.
    Each entry: rank (1 = first), class, class_index, counts, best image, screening score."""
    optimized = {cls.index for cls in chosen}
    by_class: dict[int, list[dict[str, Any]]] = {cls.index: [] for cls in classes}
    for record in records:
        if record.get("class_index") in by_class:
            by_class[record["class_index"]].append(record)
    entries = [class_entry(cls, by_class[cls.index], judged, cls.index in optimized,
                           (screening or {}).get(cls.index)) for cls in classes]  # fmt: skip
    return [{"rank": rank, **entry} for rank, entry in enumerate(sorted(entries, key=rank_key), start=1)]


@dataclass
class ScanSummary:
    """What a class scan adds to its header whenever the summary is rebuilt (RunFolder.summarizer)."""

    classes: list[ScanClass]
    chosen: list[ScanClass]
    screening: dict[int, dict[str, Any]] | None
    screen_seeds: list[int]
    top: int | None
    judged: bool

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        screened = None
        if self.screening is not None:
            screened = sorted(({"class": cls.name, **self.screening[cls.index]} for cls in self.classes),
                              key=lambda entry: (-entry["score"], entry["class_index"]))  # fmt: skip
        scan = {
            "classes": len(self.classes),
            "chosen": [cls.name for cls in self.chosen],
            "screen": len(self.screen_seeds) if self.screening is not None else None,
            "screen_seeds": self.screen_seeds if self.screening is not None else None,
            "top": self.top,
            "screening": screened,
            "ranking_rule": RANKING_RULE,
        }
        return {"scan": scan, "ranking": rank_classes(self.classes, self.chosen, records, self.screening, self.judged)}
