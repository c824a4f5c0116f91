"""MoRA (arXiv 2405.12130): a square r_hat x r_hat matrix M between fixed compress / decompress maps.

delta W = D . M . C, where C (r_hat x d_in) compresses the input and D (d_out x r_hat) decompresses
the output, both non-parametric. r_hat is chosen so that r_hat^2 matches LoRA's r (d_in + d_out)
parameters: r_hat = floor(sqrt((d_in + d_out) r) + 0.5), floored to even for the rotation type.

Types follow the official code (`kongds/MoRA`, `mora_type`; peft-mora's `lora/layer.py`):

| type | compress                          | decompress                        |
|------|-----------------------------------|-----------------------------------|
| 1    | wrap-pad, sum blocks (interleaved)| tile                              |
| 2    | contiguous-chunk sums             | repeat-interleave                 |
| 3    | contiguous-chunk sums             | tile                              |
| 4    | wrap-pad, sum blocks (interleaved)| repeat-interleave                 |
| 6    | wrap-pad, RoPE-rotate each block  | concatenate blocks, truncate/tile |

Non-official ablations from the paper with no `mora_type` in the code: "truncate" (keep the first
r_hat inputs, zero-pad the output) and "decouple" (type 6 with every rotation angle 0).

Default type [ours, following the README "type 1 for large r, type 6 for small r" and the paper's
runs at r=8 (rotation) and r=256 (sharing)]: rank >= 128 -> type 1, otherwise type 6.

Deviation from the official code where it would crash: wrap-padding repeats the input cyclically
(x_pad[k] = x[k mod d_in]), identical to the official `cat([x, x[:pad]])` whenever pad <= d_in, and
defined when r_hat > 2 d_in (where the official reshape fails). Type 6 with one block (d_in <= r_hat)
works (the official merge crashes there).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.base import DeltaLinear, MethodSpec, WeightDeltaMethod, register
from deltatune.methods.dropout import Dropout
from deltatune.methods.nf4 import NF4_OPTIONS
from deltatune.methods.options import Option, non_negative

MORA_TYPES: tuple[Any, ...] = (1, 2, 3, 4, 6, "truncate", "decouple")
LARGE_RANK = 128  # rank >= this -> type 1 (sharing), below -> type 6 (rotation)


def default_mora_type(rank: int) -> int:
    return 1 if rank >= LARGE_RANK else 6


def mora_rank(d_in: int, d_out: int, rank: int, mora_type: Any) -> int:
    """r_hat: the square size whose r_hat^2 parameters match LoRA rank `rank` on a d_in -> d_out layer."""
    r_hat = int(math.floor(math.sqrt((d_in + d_out) * rank) + 0.5))
    if mora_type in (6, "decouple"):
        r_hat -= r_hat % 2  # RoPE rotates pairs
    if r_hat < 2:
        raise ConfigError(
            f"MoRA rank {rank} gives a square size {r_hat} < 2 on a {d_in}->{d_out} layer; raise `rank`", field="rank"
        )
    return r_hat


def _group_sizes(n: int, groups: int) -> list[int]:
    """Sizes of `groups` contiguous groups covering n items: the first n mod groups get one extra."""
    small, extra = divmod(n, groups)
    return [small + 1] * extra + [small] * (groups - extra)


def _group_index(n: int, groups: int) -> torch.Tensor:
    """For each of n items, the index of its contiguous group."""
    sizes = _group_sizes(n, groups)
    return torch.repeat_interleave(torch.arange(groups), torch.tensor(sizes, dtype=torch.long))


def parse_mora_type(value: Any) -> Any:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if value not in MORA_TYPES:
        raise ConfigError(
            f"unknown mora_type {value!r}; choose one of 1, 2, 3, 4, 6, truncate, decouple", field="options.mora_type"
        )
    return value


class MoRALinear(DeltaLinear):
    """A frozen linear plus D . M . C x, with M (r_hat x r_hat) trainable and zero at init."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        mora_type: Any = None,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(base)
        self.mora_type = parse_mora_type(default_mora_type(rank) if mora_type is None else mora_type)
        d_in, d_out = self.in_features, self.out_features
        self.r_hat = r = mora_rank(d_in, d_out, rank, self.mora_type)
        self.n_blocks = -(-d_in // r)  # blocks after wrap-padding to a multiple of r_hat
        device = _base_device(base)
        self.mora_M = nn.Parameter(torch.zeros(r, r, dtype=dtype, device=device))
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self._build_maps(device)

    def _build_maps(self, device: torch.device) -> None:
        """Index maps shared by forward and delta_weight (non-persistent: rebuilt from the shapes)."""
        t, r, d_in, d_out = self.mora_type, self.r_hat, self.in_features, self.out_features
        for name in ("_wrap_idx", "_in_group", "_out_group", "_cos", "_sin"):
            self._buffers.pop(name, None)
        if t in (1, 4, 6, "decouple"):
            self.register_buffer("_wrap_idx", torch.arange(self.n_blocks * r, device=device) % d_in, persistent=False)
        if t in (2, 3):
            self.register_buffer("_in_group", _group_index(d_in, r).to(device), persistent=False)
        if t in (2, 4):
            self.register_buffer("_out_group", _group_index(d_out, r).to(device), persistent=False)
        if t in (6, "decouple"):
            inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
            pos = torch.arange(self.n_blocks, dtype=torch.float32)
            freqs = torch.outer(pos, inv_freq)
            if t == "decouple":
                freqs.zero_()
            emb = torch.cat((freqs, freqs), dim=-1)  # (n_blocks, r): rotate-half convention
            # fp32 tables; forward casts them to the compute dtype each call, so a later .to(dtype)
            # or device move never leaves stale tables behind (the official code caches them once).
            self.register_buffer("_cos", emb.cos().to(device), persistent=False)
            self.register_buffer("_sin", emb.sin().to(device), persistent=False)

    @torch.no_grad()
    def merge_and_reset(self, next_type: Any) -> None:
        """ReMoRA: fold D M C into the base weight, set M to 0 and switch the compression type. The
        layer's output is unchanged (same r_hat for the sharing types 1-4, so M keeps its shape)."""
        self.merge()
        self.merged = False  # the base now holds the change; M restarts from zero
        self._originals.clear()  # nothing to unmerge: the change is the base's own now
        self.mora_M.zero_()
        self.mora_type = parse_mora_type(next_type)
        self._build_maps(self.mora_M.device)

    # --- compression / decompression -----------------------------------------------------------
    def _rope(self, blocks: torch.Tensor) -> torch.Tensor:
        """Rotate block i (last two dims: (n_blocks, r)) by RoPE at position i."""
        h = self.r_hat // 2
        rot = torch.cat((-blocks[..., h:], blocks[..., :h]), dim=-1)
        return blocks * self._cos.to(blocks.dtype) + rot * self._sin.to(blocks.dtype)

    def _wrap_pad(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., _wrap_idx] (inputs repeated cyclically up to n_blocks * r_hat) without an index
        gather, whose backward (an accumulating scatter) is very slow on CPU; a view when no
        padding is needed."""
        need = self.n_blocks * self.r_hat
        if need == self.in_features:
            return x
        reps = -(-need // self.in_features)
        return torch.cat([x] * reps, dim=-1)[..., :need]

    def _compress(self, x: torch.Tensor) -> torch.Tensor:
        r, t = self.r_hat, self.mora_type
        if t in (1, 4):
            return self._wrap_pad(x).unflatten(-1, (self.n_blocks, r)).sum(dim=-2)
        if t in (2, 3):
            return _chunk_sums(x, _group_sizes(self.in_features, r))
        if t in (6, "decouple"):
            return self._rope(self._wrap_pad(x).unflatten(-1, (self.n_blocks, r)))
        # truncate: the first r_hat inputs, zero-padded when d_in < r_hat
        return F.pad(x[..., :r], (0, max(0, r - self.in_features)))

    def _decompress(self, z: torch.Tensor) -> torch.Tensor:
        d_out, r, t = self.out_features, self.r_hat, self.mora_type
        if t in (1, 3):
            return z.repeat(*([1] * (z.dim() - 1)), -(-d_out // r))[..., :d_out]
        if t in (2, 4):
            return z[..., self._out_group]
        if t in (6, "decouple"):
            flat = z.flatten(-2)  # concatenate the block outputs
            n = flat.shape[-1]
            if n >= d_out:
                return flat[..., :d_out]
            return flat.repeat(*([1] * (flat.dim() - 1)), -(-d_out // n))[..., :d_out]
        return F.pad(z[..., :d_out], (0, max(0, d_out - r)))

    def adapted_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x)
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.mora_M.dtype)  # under autocast the matmuls choose the dtype; no copy of x
        if self.mora_type in (6, "decouple"):
            z = self._rotated_blocks_forward(h)
        else:
            z = self._compress(h) @ self.mora_M.T
        return base_out + self._decompress(z).to(base_out.dtype)

    def _rotated_blocks_forward(self, x: torch.Tensor) -> torch.Tensor:
        """z_i = M R_i x_i for every block i, as one batched matmul with B_i = M R_i.

        Rotating the small r x r matrix (B_i = M cos_i + M P sin_i, with P the rotate-half map,
        so M P = [M[:, h:], -M[:, :h]]) costs n_blocks * r^2, against rotating the activations
        (tokens x d_in, several temporaries). Equal to M @ rope(x_i) up to rounding."""
        M, half = self.mora_M, self.r_hat // 2
        mp = torch.cat((M[:, half:], -M[:, :half]), dim=1)
        cos, sin = self._cos.to(M.dtype), self._sin.to(M.dtype)  # (n_blocks, r), indexed by column
        blocks = M[None] * cos[:, None, :] + mp[None] * sin[:, None, :]  # (n_blocks, r, r)
        xb = self._wrap_pad(x).unflatten(-1, (self.n_blocks, self.r_hat))
        lead = xb.shape[:-2]
        xb = xb.reshape(-1, self.n_blocks, self.r_hat).transpose(0, 1)  # (n_blocks, tokens, r)
        z = torch.bmm(xb, blocks.transpose(1, 2))  # (n_blocks, tokens, r)
        return z.transpose(0, 1).reshape(*lead, self.n_blocks, self.r_hat)

    def activation_numel_per_token(self) -> int:
        """What backward keeps per token (memory planning): the compressed input (r_hat) that M's gradient needs,
        or for the rotation types the wrap-padded copy of the input (`_wrap_pad` repeats it whole, then cuts),
        the blocks' products reading a view of x otherwise; plus the dropout's output."""
        padded = self.n_blocks * self.r_hat
        if self.mora_type in (6, "decouple"):
            kept = -(-padded // self.in_features) * self.in_features if padded != self.in_features else 0
        else:
            kept = self.r_hat
        return kept + (self.in_features if isinstance(self.dropout, Dropout) else 0)

    # --- explicit delta W ------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """delta W = D M C, assembled column by column from index maps (fp32, shape (out, in))."""
        M = self.mora_M.float()
        d_in, d_out, r, t = self.in_features, self.out_features, self.r_hat, self.mora_type
        if t in (1, 4):  # padded position k feeds c_{k mod r} with x_{k mod d_in}
            k = torch.arange(self.n_blocks * r, device=M.device)
            mc = torch.zeros(r, d_in, device=M.device).index_add_(1, self._wrap_idx, M[:, k % r])
        elif t in (2, 3):
            mc = M[:, self._in_group]
        elif t == "truncate":
            mc = torch.zeros(r, d_in, device=M.device)
            n = min(r, d_in)
            mc[:, :n] = M[:, :n]
        else:  # 6 / decouple: block i is M R_i; padded position k of block k // r feeds column k mod d_in
            basis = torch.eye(r, device=M.device)[:, None, :].expand(r, self.n_blocks, r)
            rotated = self._rope(basis)  # [j, i, :] = R_i e_j
            blocks = M @ rotated.permute(1, 2, 0)  # (n_blocks, r, r): M R_i
            rows = blocks.permute(1, 0, 2).reshape(r, self.n_blocks * r)  # [M R_0 | M R_1 | ...] columns
            full = torch.zeros(self.n_blocks * r, d_in, device=M.device)
            for i in range(self.n_blocks):  # block-diagonal, columns folded back by wrap-padding
                cols = self._wrap_idx[i * r : (i + 1) * r]
                full[i * r : (i + 1) * r].index_add_(1, cols, rows[:, i * r : (i + 1) * r])
            n = full.shape[0]
            return full[torch.arange(d_out, device=M.device) % n]
        # rows: which z entry each output reads
        if t in (1, 3):
            row = torch.arange(d_out, device=M.device) % r
            return mc[row]
        if t in (2, 4):
            return mc[self._out_group]
        out = torch.zeros(d_out, d_in, device=M.device)  # truncate
        n = min(r, d_out)
        out[:n] = mc[:n]
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r_hat={self.r_hat}, mora_type={self.mora_type}"


def _chunk_sums(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Sums of contiguous groups with sizes [s+1]*m + [s]*n, as two reshapes (no Python loop)."""
    big, small = sizes[0], sizes[-1]
    m = sum(1 for s in sizes if s == big) if big != small else len(sizes)
    head = x[..., : m * big].unflatten(-1, (m, big)).sum(-1)
    if m == len(sizes):
        return head
    tail = x[..., m * big :].unflatten(-1, (len(sizes) - m, small)).sum(-1)
    return torch.cat([head, tail], dim=-1)


def _base_device(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


REMORA_CYCLES = {2: (1, 2), 4: (1, 2, 3, 4)}  # the official `remora_types` settings

MORA_OPTIONS = {
    "mora_type": Option(
        None, "compression type: 1, 2, 3, 4, 6, truncate, decouple (default: 1 for rank >= 128, else 6)", (int, str)
    ),
    "remora_every": Option(
        0, "ReMoRA: merge M into W and restart it every N optimizer steps (0: off)", (int,), check=non_negative
    ),
    "remora_types": Option(
        2, "ReMoRA: cycle the types 1->2 (2) or 1->2->3->4 (4) at each merge", (int,), choices=(2, 4)
    ),
    "remora_warmup": Option(
        50, "ReMoRA: steps of linear learning-rate re-warmup after each merge", (int,), check=non_negative
    ),
}


@register
class MoRA(WeightDeltaMethod):
    """MoRA on every targeted linear; `rank` is the LoRA-equivalent rank, `alpha` is unused (scale 1).

    ReMoRA (`remora_every: N`): every N steps each layer merges D M C into its base weight, resets M to
    zero and moves to the next type of the cycle; the loop resets M's optimizer state (the hook's
    return value) and the learning rate re-warms up linearly over `remora_warmup` steps. The base
    weights then carry the training, so the run writes a whole model (`writes_full_model`)."""

    name = "mora"
    has_rank = True
    shared_fields = frozenset({"targets", "rank", "dropout"})
    options_schema = {**MORA_OPTIONS, **NF4_OPTIONS}

    def __init__(self, spec: MethodSpec) -> None:
        super().__init__(spec)
        given = self.options["mora_type"]
        self.remora_every = self.options["remora_every"]
        cycle = REMORA_CYCLES[self.options["remora_types"]]
        self.mora_type = parse_mora_type(
            given if given is not None else (cycle[0] if self.remora_every else default_mora_type(spec.rank))
        )
        if self.remora_every:
            if self.mora_type not in cycle:
                raise ConfigError(
                    f"ReMoRA cycles the types {cycle}; mora_type {self.mora_type!r} is not one of them",
                    field="options.mora_type",
                )
            if self.options["quantize_base"]:
                raise ConfigError(
                    "ReMoRA merges into the base weights every few steps, which an NF4 base would "
                    "requantise each time; use it without quantize_base",
                    field="options.remora_every",
                )
        self._cycle = cycle
        self._last_merge = 0

    @property
    def writes_full_model(self) -> bool:
        return bool(self.remora_every)

    @property
    def why_not_resume(self) -> str:
        return (
            "ReMoRA merges into the base weights, which checkpoints (trainable tensors only) do not hold"
            if self.remora_every
            else ""
        )

    def check_spec(self) -> None:
        """One-line errors for a bad rank or dropout (before r_hat is computed from the rank)."""
        from deltatune.methods.lora import check_rank_and_dropout

        check_rank_and_dropout(self.spec)

    def make_layer(self, base: nn.Module) -> DeltaLinear:
        return MoRALinear(base, self.spec.rank, self.mora_type, self.spec.dropout)

    def after_step(self, model: nn.Module, step: int) -> list[nn.Parameter]:
        if not self.remora_every or step % self.remora_every:
            return []
        self._last_merge = step
        from deltatune.methods.apply import untie_adapted_weights

        untie_adapted_weights(model)  # an adapted lm_head tied to the embeddings merges into its own copy
        modules = self.delta_modules(model)
        for module in modules:
            cycle = self._cycle
            module.merge_and_reset(cycle[(cycle.index(module.mora_type) + 1) % len(cycle)])
        return [m.mora_M for m in modules]

    def lr_factor(self, step: int) -> float:
        warm = self.options["remora_warmup"]
        if not self.remora_every or not self._last_merge or not warm:
            return 1.0
        return min(1.0, (step - self._last_merge) / warm)
