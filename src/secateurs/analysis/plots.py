"""PNG plots: accuracy vs. sparsity, and per-layer sparsity of each level."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    return plt


def _remaining_axis(ax, ticks) -> None:
    """A log x axis of percent of weights remaining, running from dense to sparse."""
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xticks(list(ticks))
    ax.set_xticklabels([f"{v:.3g}" for v in ticks])
    ax.minorticks_off()
    ax.set_xlabel("weights remaining (%)")


def _finish(plt, fig, ax, path, ylabel: str, title: str) -> Path:
    """Labels, grid and legend, then write the PNG and free the figure."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_accuracy_vs_sparsity(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Test accuracy after pruning and after fine-tuning vs. weights remaining (log x axis,
    as in Frankle & Carbin 2019, so the high-sparsity end is readable)."""
    plt = _pyplot()
    remaining = [100 * (1 - r["sparsity"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    before = [(x, r["acc_before_finetune"]) for x, r in zip(remaining, rows) if r.get("acc_before_finetune") is not None]
    ax.plot(remaining, [100 * r["test_acc"] for r in rows], "o-", label="pruned + fine-tuned" if before else "final")
    if before:
        ax.plot([x for x, _ in before], [100 * a for _, a in before], "s--", alpha=0.7, label="pruned, before fine-tune")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xticks(remaining)
    ax.set_xticklabels([f"{v:.3g}" for v in remaining])
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs. sparsity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_layer_sparsity(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Sparsity of each layer at each level: shows where a global threshold prunes."""
    plt = _pyplot()
    sparse_rows = [r for r in rows if r.get("layers")]
    layers = list(sparse_rows[0]["layers"]) if sparse_rows else []
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(layers) + 2), 4), dpi=120)
    width = 0.8 / max(1, len(sparse_rows))
    for i, r in enumerate(sparse_rows):
        xs = [j + i * width for j in range(len(layers))]
        ax.bar(xs, [100 * r["layers"][n] for n in layers], width, label=f"{100 * r['target_sparsity']:g}%")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("layer sparsity (%)")
    ax.set_title(title or "per-layer sparsity")
    ax.legend(title="target", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_method_comparison(
    series: Mapping[str, Sequence[tuple[float, float, float, float]]], path: str | Path, title: str = "",
    dense: float | None = None,
) -> Path:
    """Accuracy vs. weights remaining for several methods: ``series[method]`` is a list of
    ``(sparsity, median, min, max)`` accuracy over seeds (fractions); ``dense`` the dense
    median. Medians with min-max whiskers: one seed that fails to train shows as a long
    whisker instead of dragging a mean down. The y axis fits the medians (whiskers may be cut)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ticks: set[float] = set()
    medians = []
    for i, (method, points) in enumerate(series.items()):
        points = sorted(points)
        x = [100 * (1 - s) * (1 + 0.012 * (i - len(series) / 2)) for s, *_ in points]  # dodge
        ticks.update(100 * (1 - s) for s, *_ in points)
        med = [100 * m for _, m, _, _ in points]
        medians += med
        low = [100 * (m - lo) for _, m, lo, _ in points]
        high = [100 * (hi - m) for _, m, _, hi in points]
        ax.errorbar(x, med, yerr=[low, high], marker="o", capsize=3, label=method)
    if dense is not None:
        ax.axhline(100 * dense, color="k", linestyle=":", label="dense")
        medians.append(100 * dense)
    if medians:
        ax.set_ylim(min(medians) - 3, max(medians) + 1.5)
    _remaining_axis(ax, sorted(ticks))
    return _finish(plt, fig, ax, path, "test accuracy (%), median and min-max over seeds",
                   title or "accuracy vs. sparsity")


def plot_plasticity(cells: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """GraNet Figure 2 style: change in test accuracy after pruning and continued training vs.
    pruning ratio, one colour per pruning epoch; solid without, dashed with regeneration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    epochs = sorted({c["epoch"] for c in cells})
    colours = plt.cm.viridis([i / max(1, len(epochs) - 1) for i in range(len(epochs))])
    for colour, t in zip(colours, epochs):
        for regen, style in ((False, "o-"), (True, "s--")):
            pts = sorted((c["ratio"], c["plasticity"]) for c in cells if c["epoch"] == t and c["regeneration"] == regen)
            if pts:
                ax.plot([100 * r for r, _ in pts], [100 * v for _, v in pts], style, color=colour,
                        label=f"epoch {t}{' + regeneration' if regen else ''}")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlabel("pruning ratio (%)")
    ax.set_ylabel("test accuracy change (pt)")
    ax.set_title(title or "pruning plasticity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_rounds(
    series: Mapping[str, Sequence[tuple[float, float, float]]], path: str | Path, ylabel: str, title: str = "",
    scale: float = 100.0,
) -> Path:
    """A lottery-ticket figure (Frankle & Carbin 2019, Figures 3-4): a quantity vs. percent of
    weights remaining on a log axis that runs from dense to sparse, one line per series
    (ticket, random reinit, ...); ``series[label]`` is ``(remaining fraction, mean, std)``
    per round, the std drawn as error bars. ``scale`` multiplies means (100 for accuracy)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ticks: set[float] = set()
    for label, points in series.items():
        points = sorted(points, reverse=True)
        if not points:
            continue
        x = [100 * r for r, _, _ in points]
        ticks.update(x)
        ax.errorbar(x, [scale * m for _, m, _ in points], yerr=[scale * s for _, _, s in points],
                    marker="o", capsize=3, label=label)
    shown = sorted(ticks)
    if len(shown) > 12:  # keep labels legible: every other round, from the dense end
        shown = sorted(shown[::-1][::2])
    _remaining_axis(ax, shown)
    return _finish(plt, fig, ax, path, ylabel, title)
