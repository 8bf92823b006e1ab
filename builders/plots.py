"""Figures of the protocol runners: accuracy vs step (continual learning), proxy vs truth (NAS)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from condensed_datasets._atomic import atomic_write_bytes  # noqa: E402


def _save(fig: Any, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def continual_plot(summary: dict[str, list[dict[str, Any]]], path: str | os.PathLike, title: str) -> Path:
    """One line per method (mean accuracy per step) with a band of one std; ``summary[method]`` holds
    ``{"step", "mean", "std"}`` per step."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, rows in summary.items():
        steps = [r["step"] + 1 for r in rows]
        mean = [r["mean"] for r in rows]
        std = [r["std"] for r in rows]
        line, = ax.plot(steps, mean, marker="o", label=method)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy on seen classes (%)")
    ax.set_xticks(sorted({r["step"] + 1 for rows in summary.values() for r in rows}))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def nas_scatter(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """One panel per proxy: proxy accuracy vs ground-truth accuracy per architecture, correlations in the title."""
    truth = {r["architecture"]: r["accuracy"] for r in result["truth"]}
    proxies = result["proxies"]
    fig, axes = plt.subplots(1, len(proxies), figsize=(4.2 * len(proxies), 4), squeeze=False)
    for ax, (name, entry) in zip(axes[0], proxies.items()):
        xs = [r["accuracy"] for r in entry["table"]]
        ys = [truth[r["architecture"]] for r in entry["table"]]
        ax.scatter(xs, ys, s=14, alpha=0.8)
        rep = entry["report"]
        pick = next(r for r in entry["table"] if r["architecture"] == rep["picked"])
        ax.scatter([pick["accuracy"]], [truth[rep["picked"]]], s=60, facecolors="none", edgecolors="red",
                   label="proxy's pick")
        rho = "n/a" if rep["spearman"] is None else f"{rep['spearman']:.2f}"
        tau = "n/a" if rep["kendall"] is None else f"{rep['kendall']:.2f}"
        ax.set_title(f"{name}: Spearman {rho}, Kendall {tau}", fontsize=10)
        ax.set_xlabel(f"accuracy trained on {name} (%)")
        ax.set_ylabel("ground-truth accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)
