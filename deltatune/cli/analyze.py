"""`deltatune analyze`: how a run's weights moved -- magnitude/direction change and update spectra.

Writes into --out: decomposition.{md,json} and dd_dm.png (dD vs dM across checkpoints, with the
regression slope and correlation), spectrum.{md,json} and spectrum.png (rank@90% of dW per layer).
"""

from __future__ import annotations

import json
from pathlib import Path

from deltatune.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="weight-change analysis of a run (magnitude/direction, spectrum)",
                              description=__doc__)
    p.add_argument("--base", default=None, help="base model (default: the run's config.yaml model, else the default)")
    p.add_argument("--run", required=True, help="run folder (or an adapter / model folder)")
    p.add_argument("--checkpoints", default="all", choices=["all", "final"],
                   help="all: every checkpoint plus final (the dD-vs-dM scatter); final: the last snapshot only")
    p.add_argument("--energy", type=float, default=0.9, help="energy fraction for the spectrum's rank (default 0.9)")
    p.add_argument("--out", required=True, help="output folder for tables and plots")
    p.set_defaults(func=run)


def analyze_run(base_model, run_info, checkpoints: str = "all", energy: float = 0.9) -> dict:
    """Decomposition rows for each snapshot and the spectrum of the last one."""
    from tqdm.auto import tqdm

    from deltatune.analysis.decompose import dd_dm_fit, decomposition_rows, matrix_pairs, mean_by_type
    from deltatune.analysis.spectrum import spectrum_rows, summarise_by_type
    from deltatune.evaluate.runs import load_snapshot

    snaps = list(run_info.checkpoints) if checkpoints == "all" else []
    if run_info.final is not None:
        snaps.append(run_info.final)
    elif not snaps and run_info.checkpoints:
        snaps = [run_info.checkpoints[-1]]
    if not snaps:
        raise UserError(f"{run_info.path}: no final/ folder and no checkpoints to analyse", field="run")
    decomposition, last_pairs = [], None
    for snap in tqdm(snaps, desc="snapshots", unit="ckpt", disable=len(snaps) < 2):
        model = load_snapshot(base_model, run_info, snap)
        pairs = matrix_pairs(model, base_model)
        if not pairs:
            raise UserError(f"{snap.path}: no weight matrix differs from the base model", field="run")
        decomposition += decomposition_rows(pairs, snap.label, snap.step)
        last_pairs = pairs
        del model
    spectrum = spectrum_rows(last_pairs, energy)
    types = sorted({r["type"] for r in decomposition})
    return {"run": str(run_info.path), "label": run_info.label, "energy": energy,
            "decomposition": {"points": decomposition, "by_type": mean_by_type(decomposition),
                              "fit": dd_dm_fit(decomposition),
                              "fit_by_type": {t: dd_dm_fit(decomposition, [t]) for t in types}},
            "spectrum": {"snapshot": snaps[-1].label, "matrices": spectrum, "by_type": summarise_by_type(spectrum)}}


def decomposition_markdown(result: dict) -> str:
    from deltatune.cli.eval import format_table

    d = result["decomposition"]
    fits = [{"types": "all", **d["fit"]}] + [{"types": t, **f} for t, f in d["fit_by_type"].items()]
    return (f"# Magnitude and direction change: {result['label']}\n\n"
            "Per output unit (row of the (out, in) weight): dM = mean |m - m0|, dD = mean (1 - cos).\n\n"
            + format_table(d["by_type"], ["checkpoint", "step", "type", "matrices", "dM", "dD"])
            + "\n\n## Regression of dM on dD over (matrix, checkpoint) points\n\n"
            + format_table(fits, ["types", "points", "slope", "correlation"]) + "\n")


def spectrum_markdown(result: dict) -> str:
    from deltatune.cli.eval import format_table

    s = result["spectrum"]
    pct = int(round(result["energy"] * 100))
    types = sorted({r["type"] for r in s["matrices"]})
    layers = sorted({r["layer"] for r in s["matrices"]}, key=lambda x: (x is None, x or 0))
    grid = []
    for layer in layers:
        row = {"layer": "-" if layer is None else layer}
        for r in s["matrices"]:
            if r["layer"] == layer:
                row[r["type"]] = f"{r['rank90']}/{r['full_rank']}"
        grid.append(row)
    return (f"# Spectrum of dW: {result['label']} ({s['snapshot']})\n\n"
            f"rank@{pct}% = smallest k whose top-k singular values hold {pct}% of ||dW||_F^2.\n\n"
            + format_table(s["by_type"], ["type", "matrices", "rank90_mean", "rank90_max", "rank90_frac_mean"])
            + f"\n\n## rank@{pct}% / full rank, per layer\n\n" + format_table(grid, ["layer", *types]) + "\n")


def run(args) -> int:
    from deltatune.analysis.plots import dd_dm_plot, spectrum_plot
    from deltatune.cli.eval import write_atomic
    from deltatune.evaluate.runs import read_run
    from deltatune.models import load_model

    if not 0 < args.energy <= 1:
        raise UserError("must be in (0, 1]", field="energy")
    info = read_run(args.run)
    base, _ = load_model(args.base or info.base_model, dtype="fp32")
    result = analyze_run(base, info, args.checkpoints, args.energy)
    out = Path(args.out)
    d = result["decomposition"]
    write_atomic(out / "decomposition.json", json.dumps({k: v for k, v in result.items() if k != "spectrum"},
                                                        indent=1) + "\n")
    write_atomic(out / "decomposition.md", decomposition_markdown(result))
    write_atomic(out / "spectrum.json", json.dumps({k: v for k, v in result.items() if k != "decomposition"},
                                                   indent=1) + "\n")
    write_atomic(out / "spectrum.md", spectrum_markdown(result))
    dd_dm_plot(d["points"], d["fit"], out / "dd_dm.png", f"dD vs dM: {info.label}")
    spectrum_plot(result["spectrum"]["matrices"], out / "spectrum.png", f"Spectrum of dW: {info.label}")
    print(decomposition_markdown(result))
    print(spectrum_markdown(result))
    print(f"wrote {out}/decomposition.md, spectrum.md, dd_dm.png, spectrum.png")
    return 0
