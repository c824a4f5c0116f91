"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020).

    a(h) = h + W_up σ(W_down h + b_down) + b_up,   W_down ∈ R^{m×d}, W_up ∈ R^{d×m}, W_up = b_up = 0 at init

applied to the output h of a block's output projection, before the residual add:
- Houlsby: after the attention output projection (`o_proj`) and after the MLP (`down_proj`);
- Pfeiffer: after the MLP only.
Trainable parameters per adapter: 2·m·d + m + d (both projections carry a bias). Zero W_up and b_up make
the adapted model equal the base at init. Houlsby et al. also train the layer normalisation parameters:
option `train_norms` (default: true for "houlsby", false for "pfeiffer") trains the weight (and bias) of
every normalisation layer of the model; disabling the method swaps their original values back in. The nonlinearity sits between the projections, so an adapter
cannot fold into a weight matrix: not mergeable.

Implemented by wrapping the output projection module (`AdapterWrapped`), never by patching transformers
classes. The adapter keeps raw parameters rather than `nn.Linear` children so that another method's
"all-linear" never wraps the adapter's own projections.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods.base import Method, OriginalValues, register
from deltatune.methods.inject import innermost, layer_slots, match_targets, replace_module
from deltatune.methods.options import Option, positive_int

NONLINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
# Where each variant goes, as suffixes of module names (Llama-style names; override with options).
VARIANTS = {"houlsby": ("attn_out", "mlp_out"), "pfeiffer": ("mlp_out",)}
DEFAULT_SITES = {"attn_out": "o_proj", "mlp_out": "down_proj"}


class BottleneckAdapter(nn.Module):
    """h -> h + up(σ(down(h))), computed in the adapter's dtype (fp32 by default) and cast back."""

    def __init__(
        self,
        d: int,
        m: int,
        nonlinearity: str = "relu",
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.act_name = nonlinearity
        self.down_weight = nn.Parameter(torch.empty(m, d, dtype=dtype, device=device))
        self.down_bias = nn.Parameter(torch.zeros(m, dtype=dtype, device=device))
        self.up_weight = nn.Parameter(torch.zeros(d, m, dtype=dtype, device=device))
        self.up_bias = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))  # nn.Linear's default

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down_weight.dtype)
        z = NONLINEARITIES[self.act_name](F.linear(x, self.down_weight, self.down_bias))
        return h + F.linear(z, self.up_weight, self.up_bias).to(h.dtype)


class AdapterWrapped(nn.Module):
    """A frozen output projection followed by a bottleneck adapter on its output."""

    wraps_base_layer = True  # BitFit and "all-linear" look through it to `base`

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` of the projection keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h if self.disabled else self.adapter(h)


def _out_features(module: nn.Module) -> int:
    w = innermost(module).weight
    return w.shape[0] if isinstance(innermost(module), nn.Linear) else w.shape[1]  # Conv1D stores (in, out)


def norm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every normalisation layer (LayerNorm, RMSNorm, ...: a class named *Norm)."""
    out = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Norm"):
            out += [(f"{name}.{p}", t) for p, t in module.named_parameters(recurse=False)]
    return out


@register
class BottleneckAdapterMethod(Method):
    """options: variant ("houlsby" | "pfeiffer"), bottleneck m (default 64), nonlinearity ("relu" | "gelu" |
    "silu"), attn_out / mlp_out (module-name suffixes of the insertion points; default o_proj / down_proj),
    train_norms (default: true for houlsby, as the paper; false for pfeiffer)."""

    name = "adapter"
    kind = "addition"
    mergeable = False
    why_not_mergeable = (
        "a bottleneck adapter has a nonlinearity between its down- and up-projection, so it "
        "cannot be folded into a linear weight; keep the adapter modules at inference"
    )
    options_schema = {
        "variant": Option(
            "houlsby",
            "where adapters go: houlsby (after attention and MLP) or pfeiffer (MLP only)",
            (str,),
            choices=tuple(VARIANTS),
        ),
        "bottleneck": Option(64, "bottleneck width m", (int,), check=positive_int),
        "nonlinearity": Option(
            "relu", "the nonlinearity between the projections", (str,), choices=tuple(NONLINEARITIES)
        ),
        "attn_out": Option(DEFAULT_SITES["attn_out"], "module-name suffix of the attention output projection", (str,)),
        "mlp_out": Option(DEFAULT_SITES["mlp_out"], "module-name suffix of the MLP output projection", (str,)),
        "train_norms": Option(
            None, "also train the layer norms (default: true for houlsby, false for pfeiffer)", (bool,)
        ),
    }

    def __init__(self, spec) -> None:
        super().__init__(spec)
        o = self.options
        self.variant, self.bottleneck, self.nonlinearity = o["variant"], o["bottleneck"], o["nonlinearity"]
        self.sites = {k: o[k] for k in DEFAULT_SITES}
        self.train_norms = o["train_norms"] if o["train_norms"] is not None else self.variant == "houlsby"
        self.wrapped: list[str] = []
        self.norms: list[str] = []
        self._originals: OriginalValues | None = None

    def apply(self, model: nn.Module) -> None:
        slots = layer_slots(model)
        ids = {id(m) for m in slots.values()}
        suffixes = [self.sites[s] for s in VARIANTS[self.variant]]
        self.wrapped = match_targets(model, suffixes, accept=lambda m: id(m) in ids)
        for name in self.wrapped:
            module = model.get_submodule(name)
            w = innermost(module).weight
            adapter = BottleneckAdapter(_out_features(module), self.bottleneck, self.nonlinearity, device=w.device)
            replace_module(model, name, AdapterWrapped(module, adapter))
        if self.train_norms:
            norms = norm_parameters(model)
            self.norms = [n for n, _ in norms]
            for _, p in norms:
                p.requires_grad_(True)
            self._originals = OriginalValues([p for _, p in norms])

    def adapter_modules(self, model: nn.Module) -> list[BottleneckAdapter]:
        return [model.get_submodule(n).adapter for n in self.wrapped]

    def switchable_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(n) for n in self.wrapped]

    def set_disabled(self, model: nn.Module, disabled: bool) -> None:
        super().set_disabled(model, disabled)
        if self._originals is not None:
            self._originals.swap_in() if disabled else self._originals.swap_out()

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        for name in self.wrapped:
            for pname, p in model.get_submodule(name).adapter.named_parameters():
                yield f"{name}.adapter.{pname}", p
        if self.norms:
            params = dict(model.named_parameters())
            for name in self.norms:
                yield name, params[name]
