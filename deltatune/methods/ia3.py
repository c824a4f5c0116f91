"""(IA)3 (Liu et al. 2022, T-Few): learned vectors that rescale keys, values and the MLP's intermediate
activations, all initialised to one (so step 0 equals the base).

- On k_proj and v_proj the vector scales the layer's output (rows of W, and the bias).
- On down_proj ("feedforward" modules) it scales the layer's input, i.e. the intermediate activation
  (columns of W; the bias is untouched). This is PEFT's `is_feedforward` convention.

Parameters are stored as PEFT stores them, `ia3_l` of shape (d_out, 1) or (1, d_in), so PEFT's saved keys
map one to one. Merge multiplies the weight (and, for output scaling, the bias) in place; unmerge divides.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.base import VECTOR_ATTR, DeltaLinear, MethodSpec, WeightDeltaMethod, register
from deltatune.methods.inject import match_targets, named_by
from deltatune.methods.nf4 import NF4_OPTIONS
from deltatune.methods.options import Option

DEFAULT_TARGETS = ["k_proj", "v_proj", "down_proj"]
DEFAULT_FEEDFORWARD = ["down_proj"]


class IA3Linear(DeltaLinear):
    """A frozen linear whose output (or, for feedforward layers, input) is scaled elementwise by `ia3_l`."""

    def __init__(self, base: nn.Module, feedforward: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(base)
        self.is_feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=base.weight.device))
        setattr(self.ia3_l, VECTOR_ATTR, True)  # a vector (no weight decay), stored as a matrix as PEFT stores it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base(x)
        l = self.ia3_l.reshape(-1)  # noqa: E741
        if self.is_feedforward:
            return self.base((x.to(l.dtype) * l).to(x.dtype))
        out = self.base(x)
        return (out * l).to(out.dtype)

    def adapted_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """For callers holding base(x) already; forward() avoids the extra matmul of the input case."""
        l = self.ia3_l.reshape(-1)  # noqa: E741
        if self.is_feedforward:
            return base_out + nn.functional.linear((x.to(l.dtype) * (l - 1)).to(x.dtype), self.base_weight(x.dtype))
        return (base_out * l).to(base_out.dtype)

    def activation_numel_per_token(self) -> int:
        """The base's output, kept for the vector's gradient; a feedforward layer scales its input, which the
        base already keeps."""
        return 0 if self.is_feedforward else self.out_features

    def _scale(self) -> torch.Tensor:
        """The vector shaped to broadcast against W (out, in): a column for rows, a row for columns."""
        return self.ia3_l.detach().float()

    def delta_weight(self) -> torch.Tensor:
        """W0 (l - 1), by rows or columns (fp32). When merged, W0 is recovered as W / l."""
        w = self.base_weight(torch.float32).detach()
        l = self._scale()  # noqa: E741
        w0 = w / l if self.merged else w
        return w0 * (l - 1)

    @torch.no_grad()
    def merge(self) -> None:
        if self._already(merged=True):
            return
        self.dequantize_base()
        self._rescale(self._scale(), keep_originals=True)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._already(merged=False):
            return
        l = self._scale()  # noqa: E741
        self.dequantize_base()
        self._rescale(1.0 / l)  # an entry of l that is 0 gives NaN here: merge kept those weights, put back below
        self._put_back_original("weight", self.base.weight)
        if self.base.bias is not None:
            self._put_back_original("bias", self.base.bias)
        self.restore_quantized_base()
        self.merged = False

    def _rescale(self, factor: torch.Tensor, keep_originals: bool = False) -> None:
        """Weight (and, for output scaling, bias) times `factor`; on merge, keep what dividing again would
        not give back exactly (see DeltaLinear._keep_original)."""
        w = self.base.weight
        wf = self._stored(factor)  # a Conv1D base stores W as (in, out)
        scaled = (w.float() * wf).to(w.dtype)
        if keep_originals:
            self._keep_original("weight", w, unmerged=(scaled.float() * (1.0 / wf)).to(w.dtype))
        w.copy_(scaled)
        b = self.base.bias
        if b is not None and not self.is_feedforward:
            f = factor.reshape(-1)
            scaled = (b.float() * f).to(b.dtype)
            if keep_originals:
                self._keep_original("bias", b, unmerged=(scaled.float() * (1.0 / f)).to(b.dtype))
            b.copy_(scaled)

    def extra_repr(self) -> str:
        return f"feedforward={self.is_feedforward}"


@register
class IA3(WeightDeltaMethod):
    """(IA)3 on `targets` (the method's default, k_proj,v_proj,down_proj, when targets is "all-linear").

    Option `feedforward_modules` (default ["down_proj"]): the targets whose input, not output, is scaled;
    and the NF4 base options. `rank`, `alpha` and `dropout` do not apply."""

    name = "ia3"
    peft_type = "IA3"
    options_schema = {
        "feedforward_modules": Option(
            DEFAULT_FEEDFORWARD, "targets whose input, not output, is scaled (module-name suffixes)", (list, str)
        ),
        **NF4_OPTIONS,
    }

    def __init__(self, spec: MethodSpec) -> None:
        super().__init__(spec)
        value = self.options["feedforward_modules"]
        self._ff_regex: re.Pattern | None = None
        if isinstance(value, str) and not re.fullmatch(r"[\w.,\s]*", value):
            # a regex, full-matched against the module name (PEFT writes one when it was given one)
            try:
                self._ff_regex = re.compile(value)
            except re.error as exc:
                raise ConfigError(
                    f"method 'ia3': option feedforward_modules {value!r} is not a valid pattern ({exc})",
                    field="options.feedforward_modules",
                ) from None
            value = [value]
        elif isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(
                f"method 'ia3': option feedforward_modules must be a list of module names, got {value!r}",
                field="options.feedforward_modules",
            )
        self.feedforward = list(value)
        self._ff: set[int] = set()

    def target_spec(self) -> str | list[str]:
        return DEFAULT_TARGETS if self.spec.targets == "all-linear" else self.spec.targets

    def _is_ff(self, name: str) -> bool:
        if self._ff_regex is not None:
            return self._ff_regex.fullmatch(name) is not None
        return any(named_by(name, f) for f in self.feedforward)

    def make_layer(self, base: nn.Module) -> DeltaLinear:
        return IA3Linear(base, id(base) in self._ff)

    def apply(self, model: nn.Module) -> None:
        names = match_targets(model, self.target_spec(), inside_delta=False)
        self._ff = {id(model.get_submodule(n)) for n in names if self._is_ff(n)}
        if self.feedforward and not self._ff and "feedforward_modules" in self.spec.options:
            raise ConfigError(
                f"feedforward_modules {self.feedforward} match none of the targets", field="options.feedforward_modules"
            )
        super().apply(model)

    # --- PEFT ---------------------------------------------------------------------------------
    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        from deltatune.methods.peft_format import peft_target_modules

        if self.quant is not None:
            return None  # PEFT would lose the 4-bit base
        names = [n for n, _ in self.named_delta_modules(model)]
        ff = [n for n, m in self.named_delta_modules(model) if m.is_feedforward]
        targets = peft_target_modules(model, names)
        ff_modules = peft_target_modules(model, ff) if ff else []
        if not set(ff_modules) <= set(targets):  # PEFT refuses feedforward_modules outside target_modules,
            targets, ff_modules = sorted(names), sorted(ff)  # comparing names: both as full names, then
        return {
            "target_modules": targets,
            "feedforward_modules": ff_modules,
            "fan_in_fan_out": any(m.fan_in_fan_out for m in self.delta_modules(model)),
            "modules_to_save": None,
            "init_ia3_weights": True,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> MethodSpec | None:
        from deltatune.methods.peft_format import refuse_peft_options

        # fan_in_fan_out needs no reading: each layer's type decides it, as in PEFT
        refuse_peft_options(config, "IA3", ("modules_to_save", "exclude_modules", "layers_to_transform"))
        targets = config.get("target_modules")
        if targets is None:
            raise ConfigError("PEFT adapter_config.json has no target_modules", field="target_modules")
        if not isinstance(targets, str):
            targets = sorted(targets)
        ff = config.get("feedforward_modules") or []
        if not isinstance(ff, str):  # a string is a regex, full-matched like PEFT does
            ff = sorted(ff)
        return MethodSpec(name="ia3", targets=targets, options={"feedforward_modules": ff})
