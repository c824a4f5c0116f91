"""Auxiliary router losses and routing metrics, collected from the MoE blocks after a forward.

- Load balancing (Switch / GShard): L_aux = E * sum_e f_e * P_e, with f_e the fraction of routing
  assignments sent to expert e (before capacity drops) and P_e the mean router probability of e.
  Perfectly uniform routing gives exactly 1; expert choice is balanced by construction (f_e = 1/E),
  so its L_aux is the constant 1 and has no gradient.
  This is 1/k of transformers' load_balancing_loss_func (f_e there is the fraction of tokens, summing
  to k): the same pull there needs router_aux_loss_coef = weight / k, which exports write
  (io.transformers_aux_coef; docs/upcycling.md).
- Router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2.
Both are averaged over the MoE layers; the train loop adds weight * loss to each micro-batch's loss.
Under torchrun the gradients are summed over the processes (train/distributed.py), so each process
adds its share, weight * loss / world: the gradient is that of the mean over processes of each process's
loss. The z-loss is a mean over tokens, so that is the single process's up to share sizes; the balance loss is
not linear in the batch, so a run with it matches one process only approximately (docs/distributed.md).
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.upcycle.moe import moe_blocks, upcast


def balance_loss(logits: torch.Tensor, assigned: torch.Tensor) -> torch.Tensor:
    if logits.shape[0] == 0:  # a block that routed no token: no imbalance (a mean over nothing was NaN)
        return upcast(logits).sum()
    probs = torch.softmax(upcast(logits), dim=-1)
    f = assigned.to(probs.dtype) / assigned.sum().clamp(min=1)  # float64 routing stays float64
    return probs.shape[-1] * (f * probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[0] == 0:  # no token routed: nothing to penalise (a mean over nothing was NaN)
        return upcast(logits).sum()
    return torch.logsumexp(upcast(logits), dim=-1).pow(2).mean()


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class RouterLosses:
    """Reads every MoE block's last routing after a forward: returns the weighted auxiliary loss
    and accumulates metrics until `summary()` (expert load, router entropy, drops, the losses)."""

    def __init__(self, model: nn.Module, aux_weight: float, z_weight: float) -> None:
        self.blocks = [b for _, b in moe_blocks(model)]
        self.aux_weight, self.z_weight = aux_weight, z_weight
        for b in self.blocks:  # an export then writes transformers' equivalent coefficient (io.transformers_aux_coef)
            b.aux_loss_weight = aux_weight
        self.world = _world_size()  # gradients are summed over ranks: each rank adds 1/world of the loss
        self._reset()

    def _reset(self) -> None:
        self.n, self.aux_sum, self.z_sum, self.entropy_sum = 0, 0.0, 0.0, 0.0
        self.load = [torch.zeros(b.num_experts) for b in self.blocks]
        self.dropped, self.routed = 0, 0

    def collect(self) -> torch.Tensor:
        aux, z, logits_seen = [], [], []
        for i, b in enumerate(self.blocks):
            r = b.last_routing
            if r is None:
                continue
            logits_seen.append(r["logits"])
            aux.append(balance_loss(r["logits"], r["assigned"]))
            z.append(z_loss(r["logits"]))
            with torch.no_grad():
                p = torch.softmax(upcast(r["logits"]), dim=-1)
                if p.shape[0]:  # the mean entropy of no token is NaN: it adds nothing
                    self.entropy_sum += float(-(p * torch.log(p.clamp(min=1e-30))).sum(-1).mean())
                self.load[i] += r["processed"].float().cpu()
                self.dropped += int(r["dropped"])
                self.routed += int(r["assigned"].sum()) if b.router_type == "topk" else r["logits"].shape[0]
            b.last_routing = None
        if not aux or not any(r.shape[0] for r in logits_seen):  # a stand-in batch with no token (torchrun)
            return torch.zeros(())
        aux_t, z_t = torch.stack(aux).mean(), torch.stack(z).mean()
        self.aux_sum += float(aux_t.detach())
        self.z_sum += float(z_t.detach())
        self.n += 1
        return (self.aux_weight * aux_t + self.z_weight * z_t) / self.world

    def state_dict(self) -> dict:
        """The metrics accumulated since the last summary, as JSON (a checkpoint's), so that a run resumed between
        two logged steps logs what the uninterrupted run logs."""
        return {
            "n": self.n,
            "aux_sum": self.aux_sum,
            "z_sum": self.z_sum,
            "entropy_sum": self.entropy_sum,
            "load": [ld.tolist() for ld in self.load],
            "dropped": self.dropped,
            "routed": self.routed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.n, self.aux_sum, self.z_sum = state["n"], state["aux_sum"], state["z_sum"]
        self.entropy_sum, self.dropped, self.routed = state["entropy_sum"], state["dropped"], state["routed"]
        self.load = [torch.tensor(ld, dtype=torch.float32) for ld in state["load"]]

    def summary(self) -> dict:
        """Metrics since the last summary: per-layer expert load (fractions), mean router entropy (nats),
        dropped assignments (top-k) or untouched tokens (expert choice), and the mean auxiliary losses."""
        self._sum_over_ranks()
        if self.n == 0:
            return {}
        out = {
            "moe_aux_loss": round(self.aux_sum / self.n, 6),
            "moe_z_loss": round(self.z_sum / self.n, 6),
            "router_entropy": round(self.entropy_sum / (self.n * len(self.blocks)), 6),
            "moe_dropped": self.dropped,
            "moe_dropped_frac": round(self.dropped / max(self.routed, 1), 6),
            "expert_load": [[round(float(v), 4) for v in (ld / ld.sum().clamp(min=1))] for ld in self.load],
        }
        self._reset()
        return out

    def _sum_over_ranks(self) -> None:
        """Under torchrun, the job's metrics: every rank's counts and sums added (collective: all ranks call
        summary() at the same steps); otherwise rank 0 logged its own share of the batch."""
        if self.world == 1:
            return
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        scalars = [self.n, self.aux_sum, self.z_sum, self.entropy_sum, self.dropped, self.routed]
        packed = torch.cat([torch.tensor(scalars, dtype=torch.float64), *(ld.double() for ld in self.load)])
        packed = packed.to(device) if device is not None else packed
        dist.all_reduce(packed)
        packed = packed.cpu()
        n, self.aux_sum, self.z_sum, self.entropy_sum, dropped, routed = packed[:6].tolist()
        self.n, self.dropped, self.routed = int(n), int(dropped), int(routed)
        sizes = [len(ld) for ld in self.load]
        self.load = [part.float() for part in torch.split(packed[6:], sizes)]


def for_training(model: nn.Module, cfg) -> RouterLosses | None:
    """The train loop's hook: None for a dense model, else the collector with the configured weights."""
    if not moe_blocks(model):
        return None
    return RouterLosses(model, cfg.moe_aux_loss, cfg.moe_z_loss)
