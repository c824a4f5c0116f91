"""`deltatune analyze`: how a run's weights moved -- magnitude/direction change and update spectra.

Writes into --out: decomposition.{md,json} and dd_dm.png (dD vs dM across snapshots, with the
regression slope and correlation), spectrum.{md,json} and spectrum.png (rank@90% of dW per layer of
the last snapshot) and spectrum_time.png (rank@90% per layer type at every analysed snapshot).
The default follows the DoRA paper: three intermediate snapshots (train with --snapshot-every N;
evenly spread when there are more) and the final weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from deltatune.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="weight-change analysis of a run (magnitude/direction, spectrum)", description=__doc__
    )
    p.add_argument("--base", default=None, help="base model (default: the run's config.yaml model, else the default)")
    p.add_argument("--run", required=True, help="run folder (or an adapter / model folder)")
    p.add_argument(
        "--checkpoints",
        default="protocol",
        choices=["protocol", "all", "final"],
        help="protocol (default): 3 intermediate snapshots/checkpoints, evenly spread, plus final "
        "(the DoRA paper's); all: every one plus final; final: the last weights only",
    )
    p.add_argument("--energy", type=float, default=0.9, help="energy fraction for the spectrum's rank (default 0.9)")
    p.add_argument("--out", required=True, help="output folder for tables and plots")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier analysis in --out")
    p.set_defaults(func=run)


OUTPUTS = (
    "decomposition.json",
    "decomposition.md",
    "spectrum.json",
    "spectrum.md",
    "dd_dm.png",
    "spectrum.png",
    "spectrum_time.png",
)


def choose_snapshots(run_info, checkpoints: str = "protocol", intermediate: int = 3) -> list:
    """The snapshots to analyse, in step order, final last.

    Intermediate ones are the run's snapshots and checkpoints before the last trained step (one at
    that step holds the final weights); `protocol` keeps `intermediate` of them, evenly spread.
    """
    from deltatune.evaluate.runs import last_trained_step

    final = run_info.final
    if checkpoints == "final":
        numbered = [c for c in run_info.checkpoints if c.step is not None]  # a step-less one sorts last
        chosen = [final] if final is not None else (numbered or run_info.checkpoints)[-1:]
    else:
        inter = list(run_info.checkpoints)
        last = last_trained_step(run_info.path) if final is not None else None
        if last is not None:
            inter = [c for c in inter if c.step is None or c.step < last]
        if checkpoints == "protocol" and len(inter) > intermediate:
            picks = sorted({round(i * (len(inter) - 1) / (intermediate - 1)) for i in range(intermediate)})
            inter = [inter[i] for i in picks]
        chosen = inter + ([final] if final is not None else [])
    if not chosen:
        raise UserError(f"{run_info.path}: no final/ folder and no checkpoints to analyse", field="run")
    return chosen


def warn_if_stored_in_16_bits(snap) -> None:
    """A model folder whose weights are stored in bf16 or fp16: its dW holds the rounding of W0 + dW to that dtype
    (about 2^-9 of each weight in bf16), which can make up most of a finetuning update (rank@90% 7 became 100 in
    one check); an adapter folder or a merge saved in fp32 measures the update itself. Said on stderr."""
    import sys

    from deltatune.fileio import safetensors_header

    if snap.kind != "model":
        return
    for path in sorted(snap.path.glob("*.safetensors")):  # a truncated file was a SafetensorError traceback
        coarse = sorted({dtype for dtype, _ in safetensors_header(path, field="run").values()} & {"BF16", "F16"})
        if coarse:
            print(
                f"warning: {path} stores weights in {coarse[0].lower()}: the rounding to it is part of the dW "
                "measured here; analyse the adapter folder, or a merge saved with --save-dtype fp32",
                file=sys.stderr,
            )
            return


def analyze_run(base_model, run_info, checkpoints: str = "protocol", energy: float = 0.9) -> dict:
    """Decomposition rows for each snapshot, the spectrum of the last one and rank@energy over time."""
    from tqdm.auto import tqdm

    from deltatune.analysis.decompose import (
        dd_dm_fit,
        dd_dm_fit_within_types,
        decomposition_rows,
        matrix_pairs,
        mean_by_type,
    )
    from deltatune.analysis.spectrum import spectrum_rows, summarise_by_type
    from deltatune.evaluate.runs import load_snapshot

    snaps = choose_snapshots(run_info, checkpoints)
    decomposition, spectrum, over_time = [], [], []
    for snap in tqdm(snaps, desc="snapshots", unit="ckpt", disable=len(snaps) < 2):
        warn_if_stored_in_16_bits(snap)
        model = load_snapshot(base_model, run_info, snap)
        pairs = matrix_pairs(model, base_model)
        if not pairs:
            raise UserError(f"{snap.path}: no weight matrix differs from the base model", field="run")
        decomposition += decomposition_rows(pairs, snap.label, snap.step)
        spectrum = spectrum_rows(pairs, energy)
        over_time += [{"checkpoint": snap.label, "step": snap.step, **row} for row in summarise_by_type(spectrum)]
        del model, pairs
    types = sorted({r["type"] for r in decomposition})
    return {
        "run": str(run_info.path),
        "label": run_info.label,
        "energy": energy,
        "snapshots": [{"label": s.label, "step": s.step, "path": str(s.path)} for s in snaps],
        "decomposition": {
            "points": decomposition,
            "by_type": mean_by_type(decomposition),
            "fit": dd_dm_fit(decomposition),  # all points pooled
            "fit_within_types": dd_dm_fit_within_types(decomposition),  # the headline: no between-type effect
            "fit_by_type": {t: dd_dm_fit(decomposition, [t]) for t in types},
        },
        "spectrum": {
            "snapshot": snaps[-1].label,
            "matrices": spectrum,
            "by_type": summarise_by_type(spectrum),
            "over_time": over_time,
        },
    }


def decomposition_markdown(result: dict) -> str:
    from deltatune.cli.eval import format_table

    d = result["decomposition"]
    fits = [
        {"types": "all, within types", **d["fit_within_types"]},
        {"types": "all, pooled", **d["fit"]},
    ] + [{"types": t, **f} for t, f in d["fit_by_type"].items()]
    return (
        f"# Magnitude and direction change: {result['label']}\n\n"
        "Per output unit (row of the (out, in) weight): dM = mean |m - m0|, dD = mean (1 - cos).\n\n"
        + format_table(d["by_type"], ["checkpoint", "step", "type", "matrices", "dM", "dD"])
        + "\n\n## Regression of dM on dD over (matrix, checkpoint) points\n\n"
        + format_table(fits, ["types", "points", "slope", "correlation"])
        + "\n\nWithin types: each point relative to its layer type's mean, so that types of other scales do not "
        "make (or hide) the correlation, as pooling all points can.\n"
    )


def _rank_label(pct: str) -> str:
    """The column name of rank@energy: the JSON's "rank90" at 90%, else the energy asked for."""
    return "rank90" if pct == "90%" else f"rank@{pct}"


def _relabel(rows: list[dict], pct: str) -> list[dict]:
    """Rows whose "rank90..." keys (the JSON's names, whatever the energy) say the energy asked for."""
    return [{k.replace("rank90", _rank_label(pct)): v for k, v in r.items()} for r in rows]


def _grid_cell(matrices: list[dict]) -> str:
    """rank/full rank of one matrix; for several of a layer's matrices of one type (a mixture's experts: each
    overwrote the last, so the grid showed one expert), the range of ranks and how many there are."""
    ranks = sorted(r["rank90"] for r in matrices)
    full = max(r["full_rank"] for r in matrices)
    if len(matrices) == 1:
        return f"{ranks[0]}/{full}"
    spread = f"{ranks[0]}" if ranks[0] == ranks[-1] else f"{ranks[0]}-{ranks[-1]}"
    return f"{spread}/{full} (x{len(matrices)})"


def spectrum_markdown(result: dict) -> str:
    from deltatune.analysis.plots import _percent
    from deltatune.cli.eval import format_table

    s = result["spectrum"]
    pct = _percent(result["energy"])
    rank = _rank_label(pct)
    types = sorted({r["type"] for r in s["matrices"]})
    layers = sorted({r["layer"] for r in s["matrices"]}, key=lambda x: (x is None, x or 0))
    grid = []
    for layer in layers:
        row = {"layer": "-" if layer is None else layer}
        cells: dict[str, list[dict]] = {}
        for r in s["matrices"]:
            if r["layer"] == layer:
                cells.setdefault(r["type"], []).append(r)
        for kind, found in cells.items():
            row[kind] = _grid_cell(found)
        grid.append(row)
    return (
        f"# Spectrum of dW: {result['label']} ({s['snapshot']})\n\n"
        f"rank@{pct} = smallest k whose top-k singular values hold {pct} of ||dW||_F^2; "
        "rel_norm = ||dW||_F / ||W0||_F, how far the weights moved.\n\n"
        + format_table(
            _relabel(s["by_type"], pct),
            ["type", "matrices", f"{rank}_mean", f"{rank}_max", f"{rank}_frac_mean", "rel_norm_mean"],
        )
        + f"\n\n## rank@{pct} / full rank, per layer\n\n"
        + format_table(grid, ["layer", *types])
        + f"\n\n## rank@{pct} over training, per layer type\n\n"
        + format_table(
            _relabel(s.get("over_time", []), pct),
            [
                "checkpoint",
                "step",
                "type",
                "matrices",
                f"{rank}_mean",
                f"{rank}_max",
                f"{rank}_frac_mean",
                "rel_norm_mean",
            ],
        )
        + "\n"
    )


def run(args) -> int:
    from deltatune.analysis.plots import _percent, dd_dm_plot, spectrum_plot, spectrum_time_plot
    from deltatune.cli.eval import write_atomic
    from deltatune.cli.forgetting import base_of_runs, check_out_folder
    from deltatune.evaluate.runs import read_run
    from deltatune.fileio import strict_json
    from deltatune.models import load_model

    if not 0 < args.energy <= 1:
        raise UserError("must be in (0, 1]", field="energy")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # refused now, not after the analysis
        raise UserError(f"{out} is a file, not a folder for the tables and plots", field="out")
    check_out_folder(args.out, args.overwrite, OUTPUTS)  # an earlier analysis is replaced only when asked
    info = read_run(args.run)
    # --base against the run's own record warns, as forgetting does (two unrelated models measured as an update)
    base, _ = load_model(base_of_runs([info], args.base, "its weight change is"), dtype="fp32")
    result = analyze_run(base, info, args.checkpoints, args.energy)
    d = result["decomposition"]
    write_atomic(
        out / "decomposition.json",
        json.dumps(strict_json({k: v for k, v in result.items() if k != "spectrum"}), indent=1) + "\n",
    )
    write_atomic(out / "decomposition.md", decomposition_markdown(result))
    write_atomic(
        out / "spectrum.json",
        json.dumps(strict_json({k: v for k, v in result.items() if k != "decomposition"}), indent=1) + "\n",
    )
    write_atomic(out / "spectrum.md", spectrum_markdown(result))
    dd_dm_plot(d["points"], d["fit_within_types"], out / "dd_dm.png", f"dD vs dM: {info.label}")
    spectrum_plot(
        result["spectrum"]["matrices"], out / "spectrum.png", f"Spectrum of dW: {info.label}", energy=args.energy
    )
    spectrum_time_plot(
        result["spectrum"]["over_time"],
        out / "spectrum_time.png",
        f"rank@{_percent(args.energy)} of dW over training: {info.label}",
        energy=args.energy,
    )
    print(decomposition_markdown(result))
    print(spectrum_markdown(result))
    print(f"wrote {out}/decomposition.md, spectrum.md, dd_dm.png, spectrum.png, spectrum_time.png")
    return 0
