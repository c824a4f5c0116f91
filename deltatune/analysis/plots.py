"""PNG plots (matplotlib, Agg backend): learn vs forget, dD vs dM, spectra. Written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from deltatune.fileio import write_file_atomic  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    """The figure as a PNG, written atomically with the umask's mode (as the tables beside it)."""
    try:
        return write_file_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _percent(energy: float) -> str:
    """0.9 -> '90%', 0.95 -> '95%', 0.999 -> '99.9%'."""
    return f"{100 * energy:.4g}%"


def learn_forget_plot(
    rows: list[dict],
    path: str | os.PathLike,
    title: str = "Learning vs forgetting",
    x_unit: str = "accuracy / exact match",
    y_unit: str = "accuracy",
    x_label: str | None = None,
) -> Path:
    """Learning (gain on targets) on x, forgetting (drop on sources) on y; fractions of items unless
    `x_label` names another unit for learning (a loss decrease in nats).

    Rows with the same "group" key (a method across learning rates, as in the paper's figure) share a
    colour and are joined in order of learning; a row without one is a single labelled point.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    groups = list(dict.fromkeys(r.get("group", r["label"]) for r in rows))
    cmap = plt.get_cmap("tab10")
    for i, g in enumerate(groups):
        sel = [
            r
            for r in rows
            if r.get("group", r["label"]) == g and r["learning"] == r["learning"] and r["forgetting"] == r["forgetting"]
        ]
        sel.sort(key=lambda r: r["learning"])
        if not sel:
            continue
        colour = cmap(i % 10)
        ax.plot(
            [r["learning"] for r in sel],
            [r["forgetting"] for r in sel],
            marker="o",
            ms=5,
            color=colour,
            lw=1 if len(sel) > 1 else 0,
            label=g,
        )
        for r in sel:
            text = r.get("point_label", r["label"] if "group" not in r else "")
            if text:
                ax.annotate(
                    text, (r["learning"], r["forgetting"]), textcoords="offset points", xytext=(5, 4), fontsize=7
                )
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel(x_label or f"learning: target {x_unit} gain over base (fraction, higher is better)")
    ax.set_ylabel(f"forgetting: source {y_unit} drop from base (fraction, lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    return _save(fig, path)


def dd_dm_plot(rows: list[dict], fit: dict, path: str | os.PathLike, title: str = "") -> Path:
    """The DoRA paper's plot: direction change dD (x) against magnitude change dM (y), by checkpoint."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    cmap = plt.get_cmap("viridis", max(len(checkpoints), 2))
    for i, ck in enumerate(checkpoints):
        sel = [r for r in rows if r["checkpoint"] == ck]
        ax.scatter([r["dD"] for r in sel], [r["dM"] for r in sel], s=14, color=cmap(i), label=ck)
    xs = [r["dD"] for r in rows]
    if rows and fit.get("slope") == fit.get("slope"):  # not nan
        lo, hi = min(xs), max(xs)
        ax.plot(
            [lo, hi],
            [fit["intercept"] + fit["slope"] * lo, fit["intercept"] + fit["slope"] * hi],
            "k--",
            lw=1,
            label=f"within layer types: slope {fit['slope']:.3g}, r = {fit['correlation']:.2f}",
        )
    ax.set_xlabel("direction change dD = mean(1 - cos)")
    ax.set_ylabel("magnitude change dM = mean |m - m0|")
    ax.set_title(title or "Magnitude vs direction change")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def spectrum_plot(rows: list[dict], path: str | os.PathLike, title: str = "", energy: float = 0.9) -> Path:
    """Left: rank@energy (the rows' "rank90") per layer, one line per layer type. Right: normalised singular
    values."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in sorted({r["type"] for r in rows}):
        sel = sorted((r for r in rows if r["type"] == t), key=lambda r: (r["layer"] is None, r["layer"] or 0))
        xs = [r["layer"] if r["layer"] is not None else i for i, r in enumerate(sel)]
        ax1.plot(xs, [r["rank90"] for r in sel], marker="o", ms=3, label=t)
        mid = sel[len(sel) // 2]
        s = mid["singular_values"]
        if s and s[0] > 0:
            ax2.semilogy(range(1, len(s) + 1), [max(v / s[0], 1e-16) for v in s], label=f"{t} (layer {mid['layer']})")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("layer")
    ax1.set_ylabel(f"rank holding {_percent(energy)} of ||dW||^2")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("index i")
    ax2.set_ylabel("s_i / s_1")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.suptitle(title or "Spectrum of the weight update dW")
    return _save(fig, path)


def spectrum_time_plot(rows: list[dict], path: str | os.PathLike, title: str = "", energy: float = 0.9) -> Path:
    """Mean rank@energy of dW per layer type against the training step of each analysed snapshot."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    steps = [r["step"] for r in rows if r["step"] is not None]
    last = (max(steps) if steps else 0) + 1
    for t in sorted({r["type"] for r in rows}):
        sel = [r for r in rows if r["type"] == t]
        xs = [r["step"] if r["step"] is not None else last for r in sel]  # final/ without a step: plotted last
        ax.plot(xs, [r["rank90_mean"] for r in sel], marker="o", ms=4, label=t)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step (final weights last)")
    ax.set_ylabel(f"mean rank holding {_percent(energy)} of ||dW||^2 (singular vectors)")
    ax.set_title(title or "Spectrum of the update over training")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def rank_by_type_plot(
    spectra: dict[str, list[dict]],
    path: str | os.PathLike,
    title: str = "Rank of the weight change dW holding 90% of its energy",
) -> Path:
    """One line per run (method): mean rank@90% of dW per layer type, log scale, with the full rank dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    types = list(dict.fromkeys(r["type"] for rows in spectra.values() for r in rows))
    for label, rows in spectra.items():
        by = {r["type"]: r for r in rows}
        ax.plot(
            range(len(types)),
            [by[t]["rank90_mean"] if t in by else float("nan") for t in types],
            marker="o",
            label=label,
        )
    full = {r["type"]: r.get("full_rank") for rows in spectra.values() for r in rows}
    if types and all(full.get(t) for t in types):
        ax.plot(range(len(types)), [full[t] for t in types], "k--", lw=1, label="full rank")
    ax.set_xticks(range(len(types)), types, rotation=30)
    ax.set_yscale("log")
    ax.set_xlabel("layer type")
    ax.set_ylabel("mean rank@90% of ||dW||^2 (singular vectors)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)
