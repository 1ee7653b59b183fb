"""PNG charts for the demo and the benchmarks (matplotlib, Agg backend: no display needed): time series, latency
CDFs and ratio bars, in one style. Each function writes one file and returns its path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Series = tuple[Sequence[float], Sequence[float]]


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lines(path: Path, title: str, series: Mapping[str, Series], xlabel: str, ylabel: str,
          ylim: tuple[float, float] | None = None, steps: bool = False) -> Path:
    """One line per label: ``series[label] = (xs, ys)``."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, (xs, ys) in series.items():
        if steps:
            ax.step(list(xs), list(ys), where="post", label=label)
        else:
            ax.plot(list(xs), list(ys), label=label, marker="." if len(xs) < 40 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    return _save(fig, path)


def cdf(path: Path, title: str, samples: Mapping[str, Sequence[float]], xlabel: str) -> Path:
    """Empirical CDF of each label's samples (a latency distribution per configuration)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, values in samples.items():
        ordered = sorted(values)
        if not ordered:
            continue
        ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def bars(path: Path, title: str, values: Mapping[str, float], ylabel: str, goal: float | None = None,
         goal_label: str = "goal") -> Path:
    """One bar per label (ratios against a baseline), with an optional goal line."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = list(values)
    ax.bar(range(len(labels)), [values[k] for k in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    if goal is not None:
        ax.axhline(goal, color="tab:red", linestyle="--", label=goal_label)
        ax.legend()
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
