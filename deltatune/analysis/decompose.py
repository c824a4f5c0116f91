"""Magnitude and direction of a weight change (DoRA paper, arXiv 2402.09353, Sec. 2).

Per output unit n (a row of the PyTorch (out, in) weight, PEFT's convention):
  dM = mean_n | ||W[n]|| - ||W0[n]|| |       dD = mean_n (1 - cos(W[n], W0[n]))
Across checkpoints, one (dD, dM) point per matrix per checkpoint; the paper's signature is the
sign of the dD-vs-dM correlation: full finetuning negative, LoRA positive, DoRA negative/flat.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.methods.base import is_conv1d

_NEVER = ("lm_head", "embed_out")


@dataclass
class MatrixPair:
    name: str  # qualified module name, e.g. model.layers.3.self_attn.q_proj
    base: torch.Tensor  # W0, float32 (out, in)
    weight: torch.Tensor  # the effective (merged) weight, float32 (out, in)


def layer_type(name: str) -> str:
    return name.split(".")[-1]


def layer_types(names: list[str]) -> dict[str, str]:
    """Each matrix's type: its module's own name ("q_proj"), or its path inside the layer ("attn.c_proj",
    "mlp.c_proj") where two different modules share that name (GPT-2), so that no table averages them together."""
    within = {n: re.split(r"\.\d+\.", n)[-1] for n in names}  # the path after the layer index
    paths: dict[str, set[str]] = {}
    for n in names:
        paths.setdefault(layer_type(n), set()).add(within[n])
    return {n: layer_type(n) if len(paths[layer_type(n)]) == 1 else within[n] for n in names}


def layer_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def magnitude_direction(base: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """(dM, dD) of `weight` against `base`, per output unit (row), in float64.

    A row that is zero before and after has not turned (cos 1: reserved tokens' rows of a head often are); a
    row that is zero on one side only has no direction to compare, so it counts in dM and not in dD (it
    counted as a full turn, cos 0, even when nothing changed). dD is nan when no row has a direction."""
    w0, w = base.detach().to(torch.float64), weight.detach().to(torch.float64)
    m0, m = w0.norm(dim=1), w.norm(dim=1)
    both_zero = (m0 == 0) & (m == 0)
    has_direction = (m0 > 0) & (m > 0)
    cos = torch.where(has_direction, (w0 * w).sum(dim=1) / (m0 * m).clamp_min(1e-300), 1.0)
    counted = has_direction | both_zero
    dd = float((1.0 - cos)[counted].mean()) if counted.any() else math.nan
    return float((m - m0).abs().mean()), dd


@torch.no_grad()
def merged_weight(module: nn.Module) -> torch.Tensor:
    """The effective weight of a DeltaLinear (merge on a copy, so the model is untouched; an NF4 base is
    dequantised in the copy first)."""
    twin = copy.deepcopy(module)
    twin.dequantize_base()
    twin.base.weight.data = twin.base.weight.data.float()
    twin.merge()
    return twin.base_weight(torch.float32).detach()  # (out, in), also for GPT-2's Conv1D (stored transposed)


@torch.no_grad()
def matrix_pairs(model: nn.Module, base_model: nn.Module | None = None) -> list[MatrixPair]:
    """Every changed matrix of `model`, against its base.

    A `DeltaLinear` compares its merged weight with its own frozen base weight (any method with
    `delta_weight()`, DoRA's rescaling included). Every other linear layer that changed (full finetuning,
    alone or beside an adapter: "lora+full") is compared with the same layer of `base_model`.
    """
    from deltatune.methods.base import DeltaLinear

    deltas = [(n, m) for n, m in model.named_modules() if isinstance(m, DeltaLinear)]
    pairs = [MatrixPair(n, m.base_weight(torch.float32).detach().clone(), merged_weight(m)) for n, m in deltas]
    if base_model is None:
        if not deltas:
            raise ValueError("a model without DeltaLinear layers needs base_model to compare against")
        return _finite(pairs)
    inside_deltas = tuple(f"{n}." for n, _ in deltas)  # their own base linears, already compared above
    base_modules = dict(base_model.named_modules())
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)) or name.split(".")[-1] in _NEVER:
            continue
        if name not in base_modules or name.startswith(inside_deltas):
            continue
        # on the CPU: a model trained on a GPU is compared with a base loaded on the CPU; rows are output units
        # (GPT-2's Conv1D stores its weight transposed)
        w0 = _out_in(base_modules[name]).detach().float().cpu()
        w = _out_in(mod).detach().float().cpu()
        if w.shape != w0.shape:  # another model: its other layers were dropped silently, or all ("no change")
            from deltatune.errors import UserError

            raise UserError(
                f"'{name}' has shape {tuple(w.shape)} in the run and {tuple(w0.shape)} in the base: it was not "
                "trained from this base (name the one it was with --base)",
                field="base",
            )
        if not torch.equal(w, w0):
            pairs.append(MatrixPair(name, w0.clone(), w.clone()))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return _finite(sorted(pairs, key=lambda p: order[p.name]))


def _out_in(linear: nn.Module) -> torch.Tensor:
    return linear.weight.T if is_conv1d(linear) else linear.weight


def _finite(pairs: list[MatrixPair]) -> list[MatrixPair]:
    """The pairs, or a one-line error for a weight that is NaN or infinite (a diverged last step): the
    decomposition and the spectrum (SVD) of such a matrix mean nothing."""
    from deltatune.errors import UserError

    for pair in pairs:
        for which, w in (("trained", pair.weight), ("base", pair.base)):
            if not torch.isfinite(w).all():
                raise UserError(f"the {which} weight of '{pair.name}' holds NaN or inf values (did training diverge?)")
    return pairs


def decomposition_rows(pairs: list[MatrixPair], checkpoint: str = "final", step: int | None = None) -> list[dict]:
    rows = []
    types = layer_types([p.name for p in pairs])
    for p in pairs:
        dm, dd = magnitude_direction(p.base, p.weight)
        rows.append(
            {
                "checkpoint": checkpoint,
                "step": step,
                "name": p.name,
                "type": types[p.name],
                "layer": layer_index(p.name),
                "dM": dm,
                "dD": dd,
            }
        )
    return rows


def mean_by_type(rows: list[dict]) -> list[dict]:
    """Average dM and dD per (checkpoint, layer type)."""
    out = []
    keys = sorted(
        {(r["checkpoint"], r["step"] if r["step"] is not None else math.inf, r["type"]) for r in rows},
        key=lambda k: (k[1], k[0], k[2]),
    )
    for ck, _, t in keys:
        sel = [r for r in rows if r["checkpoint"] == ck and r["type"] == t]
        out.append(
            {
                "checkpoint": ck,
                "step": sel[0]["step"],
                "type": t,
                "matrices": len(sel),
                "dM": sum(r["dM"] for r in sel) / len(sel),
                "dD": sum(r["dD"] for r in sel) / len(sel),
            }
        )
    return out


def regression(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares slope/intercept of y on x and the Pearson correlation (nan when undefined)."""
    n = len(xs)
    if n < 2:
        return {"slope": float("nan"), "intercept": float("nan"), "correlation": float("nan"), "points": n}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx > 0 else float("nan")
    corr = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
    return {"slope": slope, "intercept": my - slope * mx if sxx > 0 else float("nan"), "correlation": corr, "points": n}


def dd_dm_fit(rows: list[dict], types: list[str] | None = None) -> dict[str, float]:
    """Regression of dM on dD over (matrix, checkpoint) points, as the DoRA paper plots them."""
    sel = [r for r in rows if types is None or r["type"] in types]
    return regression([r["dD"] for r in sel], [r["dM"] for r in sel])


def dd_dm_fit_within_types(rows: list[dict]) -> dict[str, float]:
    """The regression of dM on dD within layer types: each point is taken relative to its type's mean (the
    fixed-effects estimator), so that types whose matrices differ in scale (q against down: another fan-in,
    another norm) cannot make a correlation that no type has, or hide one every type has (Simpson's
    paradox), as pooling all points does. The line is drawn through the mean of all points."""
    by_type: dict[str, list[dict]] = {}
    for r in rows:
        by_type.setdefault(r["type"], []).append(r)
    xs, ys = [], []
    for sel in by_type.values():
        mx, my = sum(r["dD"] for r in sel) / len(sel), sum(r["dM"] for r in sel) / len(sel)
        xs += [r["dD"] - mx for r in sel]
        ys += [r["dM"] - my for r in sel]
    fit = regression(xs, ys)
    if rows and fit["slope"] == fit["slope"]:  # not nan
        gx, gy = sum(r["dD"] for r in rows) / len(rows), sum(r["dM"] for r in rows) / len(rows)
        fit["intercept"] = gy - fit["slope"] * gx
    return fit
