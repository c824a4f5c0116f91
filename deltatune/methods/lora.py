"""LoRA (arXiv 2106.09685) and rsLoRA (arXiv 2312.03732): y = W0 x + b + s * B A dropout(x).

A in R^{r x d_in}, B in R^{d_out x r}, s = alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA). B starts at
zero, so the adapted model equals the base at step 0. Parameters are named `lora_A.weight` and
`lora_B.weight` so that PEFT's saved keys map one to one.

Speed: the forward is `base(x) + s * (x A^T) B^T` and nothing else when dropout is 0 (no dropout
module call, no copy of x; the casts run only when the adapter dtype differs from x's). Dropout costs
only when asked for: on CPU it is `methods/dropout.py` (16 random bits an element instead of torch's
serial Bernoulli draws), which took a LoRA step with dropout 0.05 from +45% to +25% over no dropout.
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
from deltatune.methods.options import Option

INITS = ("kaiming", "gaussian")
ADAPTER_DTYPES = {
    "auto": None,
    "base": None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


# PEFT LoRA inits that subtract their starting B A from the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA):
# the saved adapter then belongs to that residual base, not to the model it is loaded on.
PEFT_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# PEFT LoRA sub-configurations that change the forward or add tensors (aLoRA applies the adapter only after its
# invocation tokens; Arrow routes between adapters; BD-LoRA, KaSA and MonteCLoRA change the factors).
PEFT_FORWARD_CHANGING = ("alora_invocation_tokens", "arrow_config", "use_bdlora", "kasa_config", "monteclora_config")


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(DeltaLinear):
    """A frozen linear plus s * B A. `dtype` is the adapter's dtype (default: the base weight's)."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        *,
        rslora: bool = False,
        dropout: float = 0.0,
        init: str = "kaiming",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(base)
        weight = base.weight
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout = Dropout(dropout) if dropout > 0 else None
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """PEFT's default: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)); or A ~ N(0, 1/r^2)."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise ConfigError(f"unknown LoRA init '{init}'; choose one of: {', '.join(INITS)}", field="init")
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        acc = torch.promote_types(self.lora_B.weight.dtype, torch.float32)  # float32, or float64 in a float64 model
        return (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc)) * self.scaling

    def adapted_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != a.dtype and not autocast:
            x = x.to(a.dtype)  # under autocast the matmuls pick their dtype; casting x would cost a copy
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        h = F.linear(x, a)
        if autocast or h.dtype == base_out.dtype == b.dtype:
            # base_out + s * h B^T in one GEMM that accumulates into a copy of base_out: no separate
            # output tensor for h B^T and no extra pass to add it (measured ~2% of a CPU training step)
            flat = torch.addmm(
                base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1]), b.T, alpha=self.scaling
            )
            return flat.view(base_out.shape)
        h = F.linear(h, b)
        if h.dtype != base_out.dtype:
            h = h.to(base_out.dtype)
        return torch.add(base_out, h, alpha=self.scaling)

    def activation_numel_per_token(self) -> int:
        return self.r + (self.in_features if self.lora_dropout is not None else 0)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.rslora}"


LORA_OPTIONS = {
    "init": Option(
        "kaiming", "A's init: kaiming-uniform (PEFT's default) or gaussian N(0, 1/r^2)", (str,), choices=INITS
    ),
    "adapter_dtype": Option(
        "auto", "dtype of A and B (auto: the base weight's)", (str,), choices=tuple(ADAPTER_DTYPES)
    ),
}


def rank_warning(rank: int, layers: list[tuple[str, DeltaLinear]]) -> str | None:
    """Why a rank is too large for some layers, or None: B A has rank at most min(in, out), so a larger r adds
    numbers to train and store without adding anything the update can express."""
    over = [(name, m.in_features, m.out_features) for name, m in layers if rank > min(m.in_features, m.out_features)]
    if not over:
        return None
    name, d_in, d_out = over[0]
    return (
        f"rank {rank} is above min(in, out) in {len(over)} of the {len(layers)} adapted layers (e.g. {name}, "
        f"{d_in} -> {d_out}): their update B A cannot have a rank above {min(d_in, d_out)}, so the extra rank adds "
        f"numbers to train ({rank * (d_in + d_out):,} in that layer, against {d_in * d_out:,} in its weight) "
        f"without letting the update express more; a rank of {min(d_in, d_out)} or less, or full finetuning of "
        f"those layers, can express the same updates"
    )


def check_rank_and_dropout(s: MethodSpec) -> None:
    """One-line errors for a rank that is not a positive integer or a dropout outside [0, 1)."""
    if isinstance(s.rank, bool) or not isinstance(s.rank, int) or s.rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {s.rank!r}", field="rank")
    if isinstance(s.dropout, bool) or not isinstance(s.dropout, (int, float)) or not 0 <= s.dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {s.dropout!r}", field="dropout")


@register
class LoRA(WeightDeltaMethod):
    """LoRA on the linears that `spec.targets` selects. Options: init ("kaiming" | "gaussian"),
    adapter_dtype ("auto" = the base weight's dtype, "fp32", "bf16"), and the NF4 base options."""

    name = "lora"
    has_rank = True
    shared_fields = frozenset({"targets", "rank", "alpha", "dropout", "rslora"})
    peft_type = "LORA"
    options_schema = {**LORA_OPTIONS, **NF4_OPTIONS}

    @property
    def use_rslora(self) -> bool:
        return bool(self.spec.rslora)

    def check_spec(self) -> None:
        """One-line errors for a bad rank, alpha or dropout."""
        s = self.spec
        check_rank_and_dropout(s)
        if isinstance(s.alpha, bool) or not isinstance(s.alpha, (int, float)) or not s.alpha > 0:
            raise ConfigError(f"alpha must be a positive number, got {s.alpha!r}", field="alpha")
        if not isinstance(s.rslora, bool):  # the string "false" was true
            raise ConfigError(f"rslora must be True or False, got {s.rslora!r}", field="rslora")

    def layer_kwargs(self) -> dict[str, Any]:
        s = self.spec
        return dict(
            rslora=self.use_rslora,
            dropout=s.dropout,
            init=self.options["init"],
            dtype=ADAPTER_DTYPES[self.options["adapter_dtype"]],
        )

    def make_layer(self, base: nn.Module) -> DeltaLinear:
        return LoRALinear(base, self.spec.rank, self.spec.alpha, **self.layer_kwargs())

    def training_warnings(self, model: nn.Module) -> list[str]:
        warnings = [w for w in [rank_warning(self.spec.rank, self.named_delta_modules(model))] if w]
        if self.options["adapter_dtype"] not in ("auto", "fp32"):
            warnings.append(
                f"adapter_dtype {self.options['adapter_dtype']} applies where the adapter is applied or loaded (the "
                "API, serving); training keeps what trains in fp32 and saves it so"
            )
        return warnings

    # --- PEFT ---------------------------------------------------------------------------------
    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        from deltatune.methods.peft_format import peft_target_modules

        if self.quant is not None:
            return None  # PEFT would read it back as plain LoRA and lose the 4-bit base
        init = self.options["init"]
        alpha = self.spec.alpha
        return {
            "r": self.spec.rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": self.spec.dropout,
            "use_rslora": self.use_rslora,
            "init_lora_weights": True if init == "kaiming" else "gaussian",
            "target_modules": peft_target_modules(model, [n for n, _ in self.named_delta_modules(model)]),
            "use_dora": False,
            "bias": "none",
            "fan_in_fan_out": any(m.fan_in_fan_out for m in self.delta_modules(model)),
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> MethodSpec | None:
        if cls is not LoRA or config.get("use_dora"):
            return None  # rslora is an alias; DoRA claims use_dora
        from deltatune.methods.peft_format import peft_flag, peft_number, refuse_peft_options

        refuse_peft_options(
            config,
            "LoRA",
            (
                "rank_pattern",
                "alpha_pattern",
                "layers_to_transform",
                "exclude_modules",
                "modules_to_save",
                "lora_bias",
                "target_parameters",
                "layer_replication",
                "trainable_token_indices",
                "use_qalora",
            ),
        )
        for key in PEFT_FORWARD_CHANGING:  # variants whose forward is not W0 x + s B A x: PEFT's default is None
            if config.get(key) is not None:
                raise ConfigError(
                    f"PEFT LoRA option {key}={config[key]!r} changes the layer's forward; deltatune computes plain "
                    "LoRA and would give other outputs",
                    field=key,
                )
        if config.get("use_mora"):  # the MoRA authors' fork of PEFT writes MoRA as peft_type LORA
            raise ConfigError(
                "this adapter was saved by the MoRA authors' fork of PEFT (use_mora: true); its tensors are MoRA's "
                "square matrices, which deltatune reads from its own adapter format only (method mora)",
                field="use_mora",
            )
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(PEFT_BASE_CHANGING_INITS):
            raise ConfigError(
                f"PEFT LoRA option init_lora_weights={init!r} rewrote the base weights when the adapter was made, so "
                "it fits only PEFT's residual base; save it with PEFT's path_initial_model_for_weight_conversion "
                "to get an adapter of the original base",
                field="init_lora_weights",
            )
        # fan_in_fan_out needs no reading: like PEFT, each layer's type (Conv1D or nn.Linear) decides it
        if config.get("bias", "none") != "none":
            raise ConfigError(
                f"PEFT LoRA option bias={config['bias']!r} is not supported (use method bitfit)", field="bias"
            )
        targets = config.get("target_modules")
        if targets is None:
            raise ConfigError("PEFT adapter_config.json has no target_modules", field="target_modules")
        if not isinstance(targets, str):  # a string is "all-linear" or a regex, full-matched like PEFT does
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise ConfigError(f"expected a name, pattern or list of names, got {targets!r}", field="target_modules")
            targets = sorted(targets)
        return MethodSpec(
            name="lora",
            targets=targets,
            rank=peft_number(config, "r", integer=True),
            alpha=peft_number(config, "lora_alpha"),
            dropout=peft_number(config, "lora_dropout", default=0.0),
            rslora=peft_flag(config, "use_rslora"),
            options={"init": "gaussian" if init == "gaussian" else "kaiming"},
        )


@register
class RSLoRA(LoRA):
    """rsLoRA: LoRA with s = alpha / sqrt(r), whatever `spec.rslora` says."""

    name = "rslora"
    shared_fields = LoRA.shared_fields - {"rslora"}  # always rsLoRA's scaling

    @property
    def use_rslora(self) -> bool:
        return True


@register
class QLoRA(LoRA):
    """LoRA on NF4 base weights (QLoRA): LoRA with `quantize_base` on by default. Saved in deltatune's
    adapter format, not PEFT's: PEFT would read it back as plain LoRA and lose the 4-bit base."""

    name = "qlora"
    peft_type = None
    options_schema = {**LoRA.options_schema, "quantize_base": Option(True, "store the adapted linears in NF4", (bool,))}
