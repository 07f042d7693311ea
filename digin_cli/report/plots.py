"""The optimization of one item as a plot: the loss and the reported figures against the
step, the kept (best) step marked. matplotlib, drawn off screen (Agg), saved as PNG."""

from __future__ import annotations

import io
from typing import Any

# Figures that are indices, not quantities: plotting a class index against the step says nothing.
NOT_PLOTTED = ("step", "top_class")


def plot_png(history: list[dict[str, float]] | dict[str, list[dict[str, float]]],
             best_step: int | dict[str, int] | None, title: str = "") -> bytes:  # fmt: skip
    """PNG bytes of the figures in `history` against the step, one panel per figure; with
    several modes (neuron-cf: maximized, minimized) one line per mode in each panel."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = history if isinstance(history, dict) else {"": history}
    bests = best_step if isinstance(best_step, dict) else {"": best_step}
    names = [name for name in next(iter(runs.values()), [{}])[0] if name not in NOT_PLOTTED] if runs else []
    # Fixed margins (in inches, so every panel count looks alike) rather than a constrained
    # layout: its solver took a third of a plot's time (three panels 0.21 -> 0.14 s, five
    # 0.34 -> 0.25 s), and a bench writes some 130 plots.
    width, height = 2.6 * max(1, len(names)), 2.3
    figure = Figure(figsize=(width, height), dpi=100)
    figure.subplots_adjust(left=0.45 / width, right=1 - 0.1 / width, bottom=0.42 / height, top=1 - 0.55 / height,
                           wspace=0.4)  # fmt: skip
    axes = figure.subplots(1, max(1, len(names)), squeeze=False)[0]
    for axis, name in zip(axes, names):
        for mode, steps in runs.items():
            xs = [entry["step"] for entry in steps]
            ys = [entry[name] for entry in steps]
            (line,) = axis.plot(xs, ys, marker=".", label=mode or None)
            best = bests.get(mode)
            if best is not None and best < len(ys):
                axis.axvline(best, color=line.get_color(), linestyle=":", linewidth=1)
                axis.plot([best], [ys[best]], marker="o", color=line.get_color())
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        if len(runs) > 1:
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title + "  (dotted: the kept step)", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="white")
    # RGB like every other image digin writes (matplotlib's PNGs carry an alpha channel).
    from PIL import Image

    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        rgb = io.BytesIO()
        image.convert("RGB").save(rgb, format="PNG")
    return rgb.getvalue()


def has_history(record: dict[str, Any]) -> bool:
    history = record.get("history")
    if isinstance(history, dict):
        return any(history.values())
    return bool(history)
