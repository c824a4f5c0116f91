"""Spectrum of a weight update: singular values of dW and the rank that holds 90% of its energy.

"LoRA Learns Less and Forgets Less" (Sec. 4.5): rank@90% is the smallest k with
sum_{i<=k} s_i^2 / sum_i s_i^2 >= 0.90. Computed in float64 so that an exactly low-rank update
does not gain spurious rank from rounding. Beside the rank, the update's size relative to the weight,
||dW||_F / ||W0||_F, says how far a run moved (rank alone cannot tell a large update from a small one).
"""

from __future__ import annotations

import torch

from deltatune.analysis.decompose import MatrixPair, layer_index, layer_types


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D matrix, descending, float64."""
    return torch.linalg.svdvals(delta.detach().to(torch.float64))


def rank_at_energy(s: torch.Tensor, energy: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold `energy` of sum(s^2); 0 for a zero matrix."""
    if not 0 < energy <= 1:
        raise ValueError("energy must be in (0, 1]")
    power = s.to(torch.float64) ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0
    fraction = torch.cumsum(power, 0) / total
    # a relative tolerance: 0.9 of (9, 1) must count as reached at k=1 despite float rounding
    return int(torch.searchsorted(fraction, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def spectrum_rows(pairs: list[MatrixPair], energy: float = 0.9, top: int = 8) -> list[dict]:
    """One row per matrix: shape, rank@energy, its fraction of the full rank, relative size, top singular values."""
    rows = []
    types = layer_types([p.name for p in pairs])
    for p in pairs:
        s = singular_values(p.weight - p.base)
        k = rank_at_energy(s, energy)
        full = min(p.base.shape)
        base_norm = float(torch.linalg.matrix_norm(p.base.detach().to(torch.float64)))
        rows.append(
            {
                "name": p.name,
                "type": types[p.name],
                "layer": layer_index(p.name),
                "shape": list(p.base.shape),
                "rank90": k,
                "full_rank": full,
                "rank90_frac": k / full,
                "rel_norm": float(s.pow(2).sum().sqrt()) / base_norm if base_norm > 0 else float("inf"),
                "top_singular_values": [float(x) for x in s[:top]],
                "singular_values": [float(x) for x in s],
            }
        )
    return rows


def summarise_by_type(rows: list[dict]) -> list[dict]:
    """Mean and max rank@90% and the mean relative update size per layer type (q_proj, ..., down_proj)."""
    out = []
    for t in sorted({r["type"] for r in rows}):
        sel = [r for r in rows if r["type"] == t]
        out.append(
            {
                "type": t,
                "matrices": len(sel),
                "rank90_mean": sum(r["rank90"] for r in sel) / len(sel),
                "rank90_max": max(r["rank90"] for r in sel),
                "rank90_frac_mean": sum(r["rank90_frac"] for r in sel) / len(sel),
                "rel_norm_mean": sum(r["rel_norm"] for r in sel) / len(sel),
                "full_rank": max(r["full_rank"] for r in sel),  # the spectrum plot's dashed line
            }
        )
    return out
