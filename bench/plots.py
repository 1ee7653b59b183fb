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
          ylim: tuple[float, float] | None = None, steps: bool = False, log: bool = False) -> Path:
    """One line per label: ``series[label] = (xs, ys)``; ``log``: both axes logarithmic."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, (xs, ys) in series.items():
        if steps:
            ax.step(list(xs), list(ys), where="post", label=label)
        else:
            ax.plot(list(xs), list(ys), label=label, marker="." if len(xs) < 40 else None)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
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


def quantile_cdf(path: Path, title: str, curves: Mapping[str, Sequence[float]], xlabel: str,
                 log_x: bool = False) -> Path:
    """CDFs from quantile curves: ``curves[label]`` holds the values at evenly spaced fractions 0 … 1 (what
    ``bench.report.quantiles`` records in a benchmark's JSON)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, values in curves.items():
        if len(values) < 2:
            continue
        ax.step(list(values), [i / (len(values) - 1) for i in range(len(values))], where="post", label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def grouped_bars(path: Path, title: str, groups: Mapping[str, Mapping[str, float | None]], ylabel: str,
                 goal: float | None = None, goal_label: str = "goal", log_y: bool = False) -> Path:
    """Bars by group (x axis) and series (colour): ``groups[group][series] = value``; a missing value leaves a
    gap."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(groups)
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(names))]
        ax.bar(xs, [groups[n].get(s) or 0.0 for n in names], width=width, label=s)
    ax.set_xticks(range(len(names)), names, rotation=15 if len(names) > 4 else 0,
                  ha="right" if len(names) > 4 else "center")
    if goal is not None:
        ax.axhline(goal, color="tab:red", linestyle="--", label=goal_label)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return _save(fig, path)
