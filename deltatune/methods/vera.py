"""VeRA (Kopiczko et al. 2023, arXiv 2310.11454): one pair of frozen random matrices shared by every
adapted layer, and two trained scaling vectors per layer.

    y = W0 x + Λ_b B Λ_d A x,   A ∈ R^{r×d_in_max}, B ∈ R^{d_out_max×r} (frozen, shared), Λ_d = diag(d) ∈ R^{r×r},
                               Λ_b = diag(b) ∈ R^{d_out×d_out}; a layer uses A[:, :d_in] and B[:d_out, :]

A and B are kaiming-uniform from a generator seeded with `projection_seed` (A first, then B, as PEFT);
d starts at `d_initial` (0.1) and b at zero, so step 0 equals the base. Trainable parameters per layer:
d_out + r. The paper's point: with r = 256, a layer trains a few thousand numbers instead of LoRA's
r (d_in + d_out), and the shared matrices cost nothing to store (a seed), though we save them, as PEFT
does by default (`save_projection`), so loading never depends on a generator's implementation.

Names follow PEFT (`vera_lambda_b`, `vera_lambda_d`, the shared `vera_A`/`vera_B` saved once as
`base_model.vera_A`/`base_model.vera_B`), so PEFT loads the adapter folder and we load PEFT's.
The worked example of docs/adding-a-method.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.base import DeltaLinear, MethodSpec, WeightDeltaMethod, linear_features, register
from deltatune.methods.dropout import Dropout
from deltatune.methods.inject import is_linear_or_delta, match_targets
from deltatune.methods.nf4 import NF4_OPTIONS
from deltatune.methods.options import Option, non_negative


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The shared frozen matrices, held once on the model (buffers: saved, moved with the model)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vera_A", a)
        self.register_buffer("vera_B", b)


class VeRALinear(DeltaLinear):
    """A frozen linear plus b ⊙ (B[:d_out] (d ⊙ (A[:, :d_in] x)))."""

    def __init__(self, base: nn.Module, shared: VeRAProjections, r: int, d_initial: float, dropout: float) -> None:
        super().__init__(base)
        self.__dict__["shared"] = shared  # a reference, not a submodule: the matrices are saved once
        self.r = r
        device = base.weight.device
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device))
        self.vera_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared.vera_A[:, : self.in_features], self.shared.vera_B[: self.out_features, :]

    def adapted_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self._projections()
        d, lb = self.vera_lambda_d, self.vera_lambda_b
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(d.dtype)
        out = lb * F.linear(d * F.linear(self.vera_dropout(x), a.to(x.dtype)), b.to(x.dtype))  # PEFT's expression
        return base_out + out.to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._projections()
        return (self.vera_lambda_b.float()[:, None] * b.float()) @ (self.vera_lambda_d.float()[:, None] * a.float())

    def activation_numel_per_token(self) -> int:
        return 2 * self.r + self.out_features

    def extra_repr(self) -> str:
        return f"r={self.r}"


@register
class VeRA(WeightDeltaMethod):
    """VeRA on the linears `spec.targets` selects; `rank` is r of the shared matrices (the paper uses
    256), `alpha` is unused. Options: projection_seed, d_initial, and the NF4 base options."""

    name = "vera"
    has_rank = True
    shared_fields = frozenset({"targets", "rank", "dropout"})
    peft_type = "VERA"
    ATTR = "deltatune_vera"
    options_schema = {
        "projection_seed": Option(
            0, "seed of the shared random matrices (PEFT's projection_prng_key)", (int,), check=non_negative
        ),
        "d_initial": Option(0.1, "initial value of every entry of d", (float,)),
        **NF4_OPTIONS,
    }

    def check_spec(self) -> None:
        s = self.spec
        if not isinstance(s.rank, int) or s.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {s.rank!r}", field="rank")
        if not 0 <= s.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {s.dropout!r}", field="dropout")

    def apply(self, model: nn.Module) -> None:
        """Draw A and B sized for the largest targeted layer, hang them on the model, then wrap."""
        self.check_spec()
        if hasattr(model, self.ATTR):
            raise ConfigError("method 'vera' is applied twice to one model", field="method")
        names = match_targets(model, self.target_spec(), accept=is_linear_or_delta, inside_delta=False)
        layers = [model.get_submodule(n) for n in names]
        d_in, d_out = (max(dims) for dims in zip(*(linear_features(m) for m in layers)))
        g = torch.Generator(device="cpu").manual_seed(self.options["projection_seed"])
        a, b = kaiming_uniform((self.spec.rank, d_in), g), kaiming_uniform((d_out, self.spec.rank), g)
        device = next(layers[0].parameters()).device  # a model, or serving's skeleton of one (no embeddings)
        self.shared = VeRAProjections(a.to(device), b.to(device))
        model.add_module(self.ATTR, self.shared)
        super().apply(model)

    def make_layer(self, base: nn.Module) -> DeltaLinear:
        return VeRALinear(base, self.shared, self.spec.rank, self.options["d_initial"], self.spec.dropout)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained vectors, plus the shared matrices once (PEFT's `save_projection`)."""
        shared = getattr(model, self.ATTR)
        return {**super().state_dict(model), f"{self.ATTR}.vera_A": shared.vera_A, f"{self.ATTR}.vera_B": shared.vera_B}

    def unload(self, model: nn.Module) -> None:
        super().unload(model)
        delattr(model, self.ATTR)

    # --- PEFT ---------------------------------------------------------------------------------
    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        from deltatune.methods.peft_format import peft_target_modules

        if self.quant is not None:
            return None  # PEFT would lose the 4-bit base
        return {
            "r": self.spec.rank,
            "target_modules": peft_target_modules(model, [n for n, _ in self.named_delta_modules(model)]),
            "projection_prng_key": self.options["projection_seed"],
            "save_projection": True,
            "vera_dropout": self.spec.dropout,
            "d_initial": self.options["d_initial"],
            "fan_in_fan_out": any(m.fan_in_fan_out for m in self.delta_modules(model)),
            "bias": "none",
            "modules_to_save": None,
            "init_weights": True,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> MethodSpec | None:
        from deltatune.methods.peft_format import refuse_peft_options

        # fan_in_fan_out needs no reading: each layer's type decides it
        refuse_peft_options(config, "VeRA", ("modules_to_save", "layers_to_transform", "exclude_modules"))
        if config.get("bias", "none") != "none":
            raise ConfigError(f"PEFT VeRA option bias={config['bias']!r} is not supported", field="bias")
        if not config.get("save_projection", True):
            raise ConfigError(
                "this PEFT VeRA adapter was saved without its projections (save_projection: false); "
                "deltatune loads only adapters that carry them",
                field="save_projection",
            )
        targets = config.get("target_modules")
        if targets is None:
            raise ConfigError("PEFT adapter_config.json has no target_modules", field="target_modules")
        if not isinstance(targets, str):
            targets = sorted(targets)
        return MethodSpec(
            name="vera",
            targets=targets,
            rank=int(config["r"]),
            dropout=float(config.get("vera_dropout") or 0.0),
            options={
                "projection_seed": int(config.get("projection_prng_key", 0)),
                "d_initial": float(config.get("d_initial", 0.1)),
            },
        )

    def to_peft_key(self, name: str) -> str:
        if name.startswith(self.ATTR + "."):
            return "base_model." + name[len(self.ATTR) + 1 :]  # base_model.vera_A / base_model.vera_B
        return super().to_peft_key(name)

    def from_peft_key(self, key: str) -> str:
        if key in ("base_model.vera_A", "base_model.vera_B"):
            return f"{self.ATTR}.{key.rsplit('.', 1)[1]}"
        return super().from_peft_key(key)
