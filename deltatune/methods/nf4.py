"""4-bit NormalFloat (NF4) base weights, as in QLoRA (arXiv 2305.14314), in pure PyTorch.

Why our own: it runs anywhere torch runs (tests need no bitsandbytes) and is short enough to read.
Conventions follow bitsandbytes so numbers are comparable (docs/methods-notes.md, "NF4 base"):
- the 16 NF4 values (`NF4_CODE`; `nf4_code_from_quantiles` rebuilds them from normal quantiles);
- block-wise absmax over 64 consecutive weights of the flattened (out, in) matrix; a weight's code is
  the nearest NF4 value to w / absmax (ties: the lower code, as `bucketize` over midpoints);
- two codes per byte, the first in the high nibble;
- double quantisation: absmax - mean(absmax), block-quantised in blocks of 256 to 8 bits with
  bitsandbytes' signed dynamic map (`dynamic_map_8bit`, the same construction), plus one fp32 scale
  per 256 and the fp32 mean.

`NF4Linear` is a frozen linear that stores only that and dequantises in each forward (bf16 compute by
default). It is one composable layer: any weight-delta method (LoRA, DoRA, MoRA, (IA)3, VeRA) puts it
under its `DeltaLinear` with the option `quantize_base` (base.py, `WeightDeltaMethod`); merging first
swaps it for a dequantised `nn.Linear` (`DeltaLinear.dequantize_base`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError

# bitsandbytes' NF4 table (create_normal_map(offset=0.9677083)), float32.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


def nf4_code_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 from its definition: 8 positive and 7 negative normal quantiles, one exact 0, scaled to [-1, 1].

    Positive: Phi^-1 at linspace(offset, 0.5, 9) without the last point; negative: -Phi^-1 at
    linspace(offset, 0.5, 8) without the last point. The asymmetry gives an exact zero with 16 codes.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return values / values.abs().max()


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (7 exponent bits): 256 sorted values in [-1, 1].

    For decade e = 0..6, 2^e values: the midpoints of 2^e + 1 points spaced evenly over [0.1, 1],
    times 10^(e-6), with both signs (254 values); plus 0 and 1. Dense near 0, so small absmax values
    keep their relative precision.
    """
    data: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0) * (10 ** (e - 6))
        data += mids.tolist() + (-mids).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


_DYNAMIC_MAP = dynamic_map_8bit()


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code indices (uint8) of x / absmax per block, and the fp32 absmax per block.

    x is flattened and zero-padded to whole blocks (zeros never change a block's absmax)."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block_size
    blocks = F.pad(flat, (0, pad)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1)
    code = code.to(scaled.device)
    bounds = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(scaled.reshape(-1), bounds).to(torch.uint8)
    return idx[: flat.numel()], absmax


def dequantize_blockwise(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int) -> torch.Tensor:
    n = idx.numel()
    vals = code.to(absmax.device)[idx.long()]
    vals = F.pad(vals, (0, (-n) % block_size)).view(-1, block_size) * absmax[:, None]
    return vals.reshape(-1)[:n]


def pack_4bit(idx: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' order)."""
    idx = idx.to(torch.uint8)
    if idx.numel() % 2:
        idx = F.pad(idx, (0, 1))
    return (idx[0::2] << 4) | idx[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)
    return out[:n]


@dataclass
class NF4Weight:
    """A quantised matrix: packed codes plus its scales (plain fp32, or double-quantised)."""

    packed: torch.Tensor  # uint8, ceil(numel / 2)
    absmax: torch.Tensor  # fp32 per block, or uint8 codes when double-quantised
    shape: tuple[int, ...]
    block_size: int = 64
    absmax_scale: torch.Tensor | None = None  # fp32 per dq block (double quantisation)
    absmax_offset: torch.Tensor | None = None  # fp32 scalar mean (double quantisation)
    dq_block_size: int = 256

    def scales(self) -> torch.Tensor:
        """The per-block absmax, dequantised if it was double-quantised."""
        if self.absmax_scale is None:
            return self.absmax
        return (
            dequantize_blockwise(self.absmax, self.absmax_scale, _DYNAMIC_MAP, self.dq_block_size) + self.absmax_offset
        )

    def nbytes(self) -> int:
        parts = [self.packed, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def quantize_nf4(
    w: torch.Tensor, block_size: int = 64, double_quant: bool = True, dq_block_size: int = 256
) -> NF4Weight:
    """Quantise a weight matrix to NF4 with block-wise absmax (and double-quantised absmax)."""
    if block_size < 2 or block_size % 2:
        raise ConfigError(f"NF4 block size must be an even number >= 2, got {block_size}", field="options.block_size")
    idx, absmax = quantize_blockwise(w, NF4_CODE, block_size)
    q = NF4Weight(pack_4bit(idx), absmax, tuple(w.shape), block_size, dq_block_size=dq_block_size)
    if double_quant:
        offset = absmax.mean()
        q.absmax, q.absmax_scale = quantize_blockwise(absmax - offset, _DYNAMIC_MAP, dq_block_size)
        q.absmax_offset = offset
    return q


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = 1
    for s in q.shape:
        n *= s
    idx = unpack_4bit(q.packed, n)
    return dequantize_blockwise(idx, q.scales(), NF4_CODE, q.block_size).view(q.shape).to(dtype)


class _NF4Product(torch.autograd.Function):
    """x W^T + b with W dequantised from NF4 in the forward and again in the backward.

    `F.linear` on the dequantised W would keep that full-size W for x's gradient until the backward, one per
    layer: the whole base model in the compute dtype (~13 GB for a 7B model), which is what QLoRA exists to
    avoid. Only the 4-bit codes and their scales are kept between the two passes (as bitsandbytes does)."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, absmax_scale, absmax_offset, shape):
        (size, block, dq_block, compute) = shape
        w = dequantize_nf4(NF4Weight(packed, absmax, size, block, absmax_scale, absmax_offset, dq_block), compute)
        out = F.linear(x.to(compute), w, None if bias is None else bias.to(compute)).to(x.dtype)
        ctx.save_for_backward(packed, absmax, absmax_scale, absmax_offset)
        ctx.shape, ctx.x_dtype = shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (size, block, dq_block, compute) = ctx.shape
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            packed, absmax, absmax_scale, absmax_offset = ctx.saved_tensors
            q = NF4Weight(packed, absmax, size, block, absmax_scale, absmax_offset, dq_block)
            grad_x = (grad_out.to(compute) @ dequantize_nf4(q, compute)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.to(compute).reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen linear whose weight is stored as NF4 and dequantised to `compute_dtype` per forward.

    There is deliberately no `.weight`: an in-place merge into a dequantised temporary would be lost
    silently. Use `dequantize()` to read it and `to_linear()` for a plain layer (what merge does).
    """

    def __init__(
        self,
        q: NF4Weight,
        bias: torch.Tensor | None,
        orig_dtype: torch.dtype,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.block_size, self.dq_block_size = q.block_size, q.dq_block_size
        self.orig_dtype, self.compute_dtype = orig_dtype, compute_dtype
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_offset", q.absmax_offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> "NF4Linear":
        w = linear.weight.detach()
        q = quantize_nf4(w, block_size, double_quant)
        return cls(q, linear.bias, w.dtype, compute_dtype)

    def quantized(self) -> NF4Weight:
        return NF4Weight(
            self.packed,
            self.absmax,
            (self.out_features, self.in_features),
            self.block_size,
            self.absmax_scale,
            self.absmax_offset,
            self.dq_block_size,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.quantized(), dtype or self.compute_dtype)

    def weight_nbytes(self) -> int:
        """Bytes of the stored weight including every scale (the bias is not part of the weight)."""
        return self.quantized().nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantized()
        shape = (q.shape, q.block_size, q.dq_block_size, self.compute_dtype)
        return _NF4Product.apply(x, self.bias, q.packed, q.absmax, q.absmax_scale, q.absmax_offset, shape)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain frozen `nn.Linear` holding the dequantised weight, in the original dtype."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.packed.device,
            dtype=self.orig_dtype,
        )
        lin.weight.copy_(self.dequantize(torch.float32))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        lin.requires_grad_(False)
        return lin

    def extra_repr(self) -> str:
        dq = self.absmax_scale is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"double_quant={dq}, compute_dtype={self.compute_dtype}"
        )


# --- use from a method: `options: {quantize_base: true, block_size: 64, double_quant: true, compute_dtype: bfloat16}`

from deltatune.methods.options import Option, even_at_least_2  # noqa: E402


@dataclass
class QuantOptions:
    block_size: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    merge_requantize: bool = False


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}

# The options every weight-delta method accepts for an NF4 base (merged into its schema).
NF4_OPTIONS: dict[str, Option] = {
    "quantize_base": Option(False, "store the adapted linears in NF4 (QLoRA's base)", (bool,)),
    "block_size": Option(64, "weights per absmax block", (int,), check=even_at_least_2),
    "double_quant": Option(True, "quantise the absmax values too (8-bit, blocks of 256)", (bool,)),
    "compute_dtype": Option(
        "bfloat16", "dtype the weight is dequantised to in forward", (str,), choices=tuple(_DTYPES)
    ),
    "merge_requantize": Option(False, "after a merge, quantise the merged weights again (lossy)", (bool,)),
}


def quant_options(options: dict[str, Any]) -> QuantOptions | None:
    """The NF4 settings from a method's checked options; None unless the base is to be quantised."""
    if not options.get("quantize_base"):
        return None
    return QuantOptions(
        int(options["block_size"]),
        bool(options["double_quant"]),
        _DTYPES[options["compute_dtype"]],
        bool(options["merge_requantize"]),
    )


def quantize_bases(modules: Iterable[nn.Module], opts: QuantOptions) -> None:
    """Replace the frozen base linear of each adapter module by an NF4Linear (the QLoRA base).

    Only the adapted layers are quantised: with all-linear targets (the QLoRA recipe) that is every
    linear but the output head."""
    for module in modules:
        if isinstance(module.base, nn.Linear):
            module.base = NF4Linear.from_linear(module.base, opts.block_size, opts.double_quant, opts.compute_dtype)


@torch.no_grad()
def requantize_bases(modules: Iterable[nn.Module], opts: QuantOptions) -> None:
    """Quantise merged bases back to NF4. Lossy: the merged weights move by up to the NF4 step."""
    warnings.warn(
        "requantising merged weights to NF4: the merged model differs from the unmerged one by the "
        "quantisation error of the new weights",
        stacklevel=2,
    )
    quantize_bases(modules, opts)
