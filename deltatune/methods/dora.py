"""DoRA (arXiv 2402.09353): W' = m * (W0 + s B A) / ||W0 + s B A||, one magnitude per output unit.

The norm is over each row of the (out, in) weight (PEFT's convention), so m has d_out entries and is
initialised to the row norms of W0 (B = 0), which makes step 0 equal the base.

Forward without building W' (PEFT's form): with n = ||W0 + s B A|| recomputed every call,
    y = base(x) + (m/n - 1) (W0 x) + (m/n) s B A dropout(x) = (m/n) (W0 x + s B A dropout(x)) + b,
computed in the second form, where W0 x = base(x) - b is read off the base output (the bias is not rescaled). Unlike PEFT in training
with dropout (which runs a second W0 dropout(x) matmul), the magnitude term always uses the undropped x:
that is the formula above, and one matmul cheaper.

By default n is a constant in backward (paper section 4.3: "detach"), computed under no_grad so no graph
is kept for it; `exact_grad: true` backpropagates through n. `delta_weight()` is the additive change
W' - W0; merge stores W' and caches n* so unmerge recovers W0 = W' n*/m - s B A.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods.base import DeltaLinear, MethodSpec, outside_autocast, register
from deltatune.methods.lora import LoRA, LoRALinear
from deltatune.methods.options import Option


def nonzero(norms: torch.Tensor) -> torch.Tensor:
    """`norms` with its zeros replaced by 1, to divide by: a row of W0 that is all zeros (an untrained reserved
    token's row of a tied head) has magnitude 0 and norm 0, and m / n was 0 / 0 = NaN in every output; its row now
    stays 0, as in the base."""
    return torch.where(norms != 0, norms, torch.ones_like(norms))


class DoRALinear(LoRALinear):
    """LoRA plus a trainable magnitude `lora_magnitude_vector` (d_out) and per-row normalisation."""

    def __init__(self, base: nn.Module, r: int, alpha: float, *, exact_grad: bool = False, **lora_kwargs: Any) -> None:
        super().__init__(base, r, alpha, **lora_kwargs)
        self.exact_grad = exact_grad
        self.lora_magnitude_vector = nn.Parameter(
            torch.empty(self.out_features, dtype=self.lora_A.weight.dtype, device=self.lora_A.weight.device)
        )
        self.reset_magnitude()
        self._merged_norm: torch.Tensor | None = None  # n* cached at merge time

    def base_changed(self) -> None:
        self.reset_magnitude()  # step 0 must equal the (now quantised) base

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m <- ||W0 + s B A|| (= ||W0|| at init); called again after the base is quantised."""
        self.lora_magnitude_vector.copy_(self._direction(self._base_weight()).norm(dim=1))

    @property
    def _fdtype(self) -> torch.dtype:
        """fp32, or the adapter's dtype when wider (float64 in exactness tests)."""
        return torch.promote_types(self.lora_A.weight.dtype, torch.float32)

    def _base_weight(self) -> torch.Tensor:
        """W0 in fp32 (or wider), dequantised when the base is NF4."""
        return self.base_weight(self._fdtype)

    def _lora_weight(self) -> torch.Tensor:
        dt = self._fdtype
        return (self.lora_B.weight.to(dt) @ self.lora_A.weight.to(dt)) * self.scaling

    def _direction(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self._lora_weight()

    def weight_norm(self) -> torch.Tensor:
        """n = ||W0 + s B A|| per output row (fp32); a constant for autograd unless exact_grad."""
        if self.exact_grad:
            return self._direction(self._base_weight().detach()).norm(dim=1)
        with torch.no_grad():
            if self.base_is_quantized:
                return self._direction(self._base_weight()).norm(dim=1)
            return self._expanded_norm()

    def _expanded_norm(self) -> torch.Tensor:
        """||W0 + s B A||_row from ||W0||^2 + 2 s <W0, BA> + s^2 ||BA||^2, without forming any (out x in)
        matrix: ||W0||^2 is cached while W0 is unchanged, <W0, BA>_row = <B_row, (W0 A^T)_row> costs one
        (out x in) @ (in x r) product in W0's dtype, ||BA||^2_row = <B_row, (B A A^T)_row> is r-sized.
        Measured on the 135M model: this and the bf16 forward below took DoRA from 1.46x to 1.18x slower
        per token than LoRA (docs/benchmarks.md)."""
        w0 = self._stored(self.base.weight)  # (out, in): a transposed view for a Conv1D base
        key = (w0.data_ptr(), w0._version, w0.dtype)
        if getattr(self, "_w0_sq_key", None) != key:
            self._w0_sq = w0.to(self._fdtype).pow(2).sum(dim=1)
            self._w0_sq_key = key
        dt = self._fdtype
        a, b = self.lora_A.weight.to(dt), self.lora_B.weight.to(dt)
        w0_at = (w0 @ a.to(w0.dtype).T).to(dt)  # (out, r)
        cross = (b * w0_at).sum(dim=1)
        ba_sq = (b * (b @ (a @ a.T))).sum(dim=1)
        s = self.scaling
        return (self._w0_sq + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt()

    def adapted_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """y = (m/n) v + b with v = W0 x + s B A dropout(x) built by one addmm into W0 x. Autograd keeps one
        output-sized tensor per layer (v, for the magnitude's gradient), in the autocast dtype under
        autocast: the earlier form (m/n - 1) W0 x + (m/n) s B A x kept two, in fp32, and made a DoRA r=8
        step of the learn-forget experiment peak at 13.6 GB against full finetuning's 9.4 GB."""
        a, b = self.lora_A.weight, self.lora_B.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        scale = self.lora_magnitude_vector.to(self._fdtype) / nonzero(self.weight_norm())  # m / n
        w0x = base_out if self.base.bias is None else base_out - self.base.bias
        if x.dtype != a.dtype and not autocast:
            x = x.to(a.dtype)  # under autocast the matmuls pick their dtype; casting x would cost a copy
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        h = F.linear(x, a)
        if autocast or h.dtype == w0x.dtype == b.dtype:
            v = torch.addmm(w0x.reshape(-1, w0x.shape[-1]), h.reshape(-1, h.shape[-1]), b.T, alpha=self.scaling)
            y = v.view(w0x.shape) * scale.to(v.dtype)
        else:  # a base in another dtype than the adapter, without autocast: work in the adapter's dtype
            v = torch.add(w0x.to(h.dtype), F.linear(h, b), alpha=self.scaling)
            y = (v * scale.to(v.dtype)).to(base_out.dtype)
        return y if self.base.bias is None else y + self.base.bias.to(y.dtype)

    def activation_numel_per_token(self) -> int:
        return super().activation_numel_per_token() + self.out_features  # v, kept for the magnitude's gradient

    def merged_weight(self) -> torch.Tensor:
        """W' = (m / n) (W0 + s B A), fp32."""
        w0 = self._unmerged_base_weight()
        v = self._direction(w0)
        m = self.lora_magnitude_vector.detach().to(self._fdtype)
        return (m / nonzero(v.norm(dim=1)))[:, None] * v

    def _unmerged_base_weight(self) -> torch.Tensor:
        w = self._base_weight().detach()
        if not self.merged:
            return w
        m = self.lora_magnitude_vector.detach().to(self._fdtype)
        return w * (self._merged_norm / nonzero(m))[:, None] - self._lora_weight().detach()

    def delta_weight(self) -> torch.Tensor:
        """The additive change W' - W0 (fp32), so code that adds delta_weight() to W0 gets W'."""
        with torch.no_grad():
            return self.merged_weight() - self._unmerged_base_weight()

    @torch.no_grad()
    @outside_autocast
    def merge(self) -> None:
        if self._already(merged=True):
            return
        self.dequantize_base()
        v = self._direction(self._base_weight())
        norm = v.norm(dim=1)
        m = self.lora_magnitude_vector.to(self._fdtype)
        w = self.base.weight
        merged = self._stored(((m / nonzero(norm))[:, None] * v).to(w.dtype))
        self._merged_norm = norm
        self._keep_original("weight", w, unmerged=self._stored(self._unmerged_from(self._stored(merged))))
        w.copy_(merged)
        self.merged = True

    @torch.no_grad()
    @outside_autocast
    def unmerge(self) -> None:
        if self._already(merged=False):
            return
        self.dequantize_base()
        w = self.base.weight
        w.copy_(self._stored(self._unmerged_from(self._stored(w))))
        self._put_back_original("weight", w)
        self._merged_norm = None
        self.restore_quantized_base()
        self.merged = False

    def _unmerged_from(self, merged: torch.Tensor) -> torch.Tensor:
        """W0 = W' n* / m - s B A, in W's dtype (merge predicts with it what unmerge will compute)."""
        m = self.lora_magnitude_vector.to(self._fdtype)
        return (merged.to(self._fdtype) * (self._merged_norm / nonzero(m))[:, None] - self._lora_weight()).to(
            merged.dtype
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dora=True, exact_grad={self.exact_grad}"


@register
class DoRA(LoRA):
    """DoRA on the linears `spec.targets` selects. Options: LoRA's, exact_grad (false), and the NF4 base
    options (quantize_base, block_size, double_quant, compute_dtype, merge_requantize)."""

    name = "dora"
    peft_type = "LORA"
    options_schema = {
        **LoRA.options_schema,
        "exact_grad": Option(False, "backpropagate through the row norm (the paper detaches it)", (bool,)),
    }

    def make_layer(self, base: nn.Module) -> DeltaLinear:
        return DoRALinear(
            base, self.spec.rank, self.spec.alpha, exact_grad=self.options["exact_grad"], **self.layer_kwargs()
        )

    # --- PEFT: LoRA's config with use_dora; the magnitude is saved as `...lora_magnitude_vector` ---
    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        config = super().peft_config(model)  # None with an NF4 base: deltatune's own format keeps it
        if config is not None:
            config["use_dora"] = True
        return config

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> MethodSpec | None:
        if cls is not DoRA or not config.get("use_dora"):
            return None
        spec = LoRA.from_peft_config({**config, "use_dora": False})
        assert spec is not None
        spec.name = "dora"
        return spec
