"""The pictures of a run report, drawn with matplotlib and returned as PNG bytes.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly, never through pyplot: no
display is needed, no global figure state leaks between calls, and a GUI backend chosen by the user's
matplotlib configuration is never touched.
"""

from __future__ import annotations

import io

import numpy as np

DPI = 100
_WRONG = "#c0392b"


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _short(label: str, width: int = 22) -> str:
    """A name (class, file) as a figure shows it: cut to `width`, and with `$` escaped, or matplotlib would
    read a name with two `$` in it as mathtext (and fail on one that is not valid mathtext)."""
    label = label if len(label) <= width else label[: width - 1] + "\u2026"
    return label.replace("$", r"\$")


def confusion_matrix(matrix, labels: list[str], title: str = "Confusion matrix") -> bytes:
    """Row-normalised confusion matrix (each row: where the images of one true class went).

    The figure grows with the number of classes and cells carry their percentage while they stay large
    enough to read (up to 40 classes); colour alone carries larger matrices.
    """
    counts = np.asarray(matrix, dtype=np.float64)
    n = len(labels)
    support = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    side = min(max(4.5, 0.38 * n + 2.5), 30)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fontsize = 10 if n <= 10 else (8 if n <= 25 else 6)
    ax.set_xticks(range(n), [_short(x) for x in labels], rotation=90 if n > 6 else 45,
                  ha="center" if n > 6 else "right", fontsize=fontsize)
    ax.set_yticks(range(n), [f"{_short(x)} ({int(s)})" for x, s in zip(labels, support[:, 0])], fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (images)")
    ax.set_title(title)
    if n <= 40:
        for i in range(n):
            for j in range(n):
                if counts[i, j] > 0:
                    value = norm[i, j]
                    ax.text(j, i, f"{value * 100:.0f}", ha="center", va="center", fontsize=fontsize - 1,
                            color="white" if value > 0.5 else "black")
    # Cell borders keep neighbouring pale cells apart when there are many classes.
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the true class's images")
    return _png(fig)


def training_curves(history: list[dict]) -> bytes | None:
    """Loss and accuracy per epoch over both stages, with the start of stage 2 marked; None without history."""
    rows = [r for r in history if r.get("epoch") is not None]
    if not rows:
        return None
    x = np.arange(1, len(rows) + 1)
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style, name in ((metric, "-o", "train"), (f"val_{metric}", "--s", "validation")):
            values = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)
            if not np.all(np.isnan(values)):
                ax.plot(x, values, style, markersize=3, label=name)
        boundaries = [i for i in range(1, len(rows)) if rows[i].get("stage") != rows[i - 1].get("stage")]
        for b in boundaries:
            ax.axvline(b + 0.5, color="grey", linestyle=":", linewidth=1.5)
            # Text on the roomier side of the line, so that it stays inside the axes.
            right = b < len(rows) / 2
            label = f"stage {rows[b].get('stage')} \u2192"
            ax.text(b + 0.5, 0.99, f" {label}" if right else f"{label} ",
                    transform=ax.get_xaxis_transform(), va="top", ha="left" if right else "right", fontsize=8,
                    color="dimgrey")
        ax.set_xlabel("epoch (both stages, in order)")
        ax.set_title(metric)
        if metric == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def per_class_recall(per_class: dict) -> bytes:
    """Horizontal bars of recall per class, worst first, each with its support."""
    items = sorted(per_class.items(), key=lambda kv: (kv[1]["recall"], kv[0]))
    n = len(items)
    fig = _figure(7, min(max(2.5, 0.28 * n + 1.2), 40))
    ax = fig.add_subplot()
    y = np.arange(n)
    recalls = [v["recall"] for _, v in items]
    colors = [_WRONG if r < 0.5 else ("#e67e22" if r < 0.8 else "#2e86c1") for r in recalls]
    ax.barh(y, recalls, color=colors)
    fontsize = 9 if n <= 25 else 7
    ax.set_yticks(y, [_short(k, 28) for k, _ in items], fontsize=fontsize)
    ax.invert_yaxis()
    for yi, (name, v) in zip(y, items):
        ax.text(min(v["recall"], 1.0) + 0.01, yi, f"{v['recall']:.2f} (n={v['support']})", va="center",
                fontsize=fontsize - 1)
    ax.set_xlim(0, 1.25)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel("recall (share of the class's images classified correctly)")
    ax.set_title("Recall per class, worst first")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def reliability_diagram(bins: list[dict], ece: float) -> bytes:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration and the bin counts."""
    fig = _figure(5.5, 6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    acc = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins])
    conf = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins])
    filled = ~np.isnan(acc)
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.bar(lower[filled], acc[filled], width=width[filled], align="edge", color="#2e86c1",
            edgecolor="white", label="accuracy")
    # Hatched and unfilled, so the gap stays visible where it lies inside the bar (an under-confident bin).
    top.bar(lower[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width[filled], align="edge",
            fill=False, hatch="///", edgecolor=_WRONG, linewidth=0.8, label="gap to mean confidence")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {ece:.3f})")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(lower, [b["count"] for b in bins], width=width, align="edge", color="grey", edgecolor="white")
    bottom.set_xlabel("confidence (highest class probability)")
    bottom.set_ylabel("images")
    return _png(fig)


def wrong_predictions(items: list[dict], columns: int = 4) -> bytes | None:
    """A grid of misclassified images, most confident first: each titled with true and predicted class.

    `items`: dicts with `pixels` (uint8 HxWx3), `true`, `predicted`, `confidence` and `name` (file name).
    """
    if not items:
        return None
    columns = min(columns, len(items))
    rows = int(np.ceil(len(items) / columns))
    cell_w, cell_h, header = 2.4, 2.9, 0.45
    # Fixed cell positions instead of a layout engine: laying out 16 image axes is what made this figure slow.
    fig = _figure(cell_w * columns, cell_h * rows + header, layout=None)
    width, height = fig.get_size_inches()
    for k, item in enumerate(items):
        r, c = divmod(k, columns)
        left = (c * cell_w + 0.15) / width
        bottom = (height - header - (r + 1) * cell_h + 0.35) / height
        ax = fig.add_axes((left, bottom, (cell_w - 0.3) / width, (cell_h - 0.95) / height))
        ax.imshow(item["pixels"], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"true: {_short(item['true'], 18)}\npred: {_short(item['predicted'], 18)} "
                     f"({item['confidence'] * 100:.0f}%)", fontsize=9, color=_WRONG)
        ax.text(0.5, -0.03, _short(item.get("name", ""), 30), transform=ax.transAxes, ha="center", va="top",
                fontsize=7, color="dimgrey")
    fig.suptitle("Most confidently wrong predictions", y=1 - 0.12 / height, va="top")
    return _png(fig)


def trials(records: list[dict], name: str, direction: str) -> bytes:
    """The objective of each trial of a search, the best so far, and failed trials marked at the bottom."""
    xs = [i for i, r in enumerate(records) if r.get(name) is not None]
    ys = [records[i][name] for i in xs]
    failed = [i for i, r in enumerate(records) if r["status"] in ("failed", "invalid")]
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    if xs:
        ax.plot(xs, ys, "o", label=name)
        running = np.minimum.accumulate(ys) if direction == "min" else np.maximum.accumulate(ys)
        ax.step(xs, running, where="post", label="best so far")
    if failed:
        low = min(ys) if ys else 0.0
        ax.plot(failed, [low] * len(failed), "x", color=_WRONG, label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel(name)
    ax.set_title(f"{name} per trial")
    ax.grid(alpha=0.3)
    if xs or failed:
        ax.legend(loc="best")
    return _png(fig)
