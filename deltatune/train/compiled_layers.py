"""Decoder layers under torch.compile (`compile_layers`), for the element-wise work between matmuls.

A CPU LoRA step of the default model is about two thirds matmuls; the rest is many small element-wise passes
(norms, rotary, SiLU times up, residual adds, LoRA's scale-and-add, casts), each a trip over memory. Compiling
each decoder layer lets inductor fuse them: measured 1.06-1.14x a step on an AVX-512 bf16 EPYC
(`benchmarks/compile_layers.py`, docs/benchmarks.md), for 20-60 s of compilation in the first step.

What this module arranges, and why:
- `nn.Module.compile` on each layer instance (and the final norm): the layers share one code object, so they
  share compiled graphs; nothing in transformers is patched, and `restore` puts the eager call back.
- `dynamic=True`: one graph for every sequence length from the first call, so a resumed run runs the kernels
  the uninterrupted one ran, whatever lengths either saw first.
- `fallback_random`: random numbers inside the graphs (adapter dropout) come from torch's own generator as in
  eager mode, so they follow the seed and a checkpoint's RNG state exactly.
- Packed attention stays eager behind a graph break, with the spans hidden from dynamo's guards
  (`packed_attention.COMPILED_NAME`); the fused RMSNorm is not installed (inductor fuses the norms itself).

`compile_layers: auto` (the default) compiles where it was measured to pay: single-process CPU runs of the
methods tested under compilation that plan at least AUTO_MIN_TOKENS tokens. On the three CPU kinds measured
(docs/benchmarks.md) a LoRA step of the default model was 1.06-1.24x faster and the first step 11-51 s slower,
so the compilation is paid back after 35-350 steps of ~800 tokens: 60k-290k tokens. Shorter runs, the demo and
the tests stay eager (and bitwise reproducible against eager runs); `true` and `false` decide outright.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from deltatune.errors import ConfigError

OPTIONS = {"fallback_random": True}

AUTO_MIN_TOKENS = 500_000  # above the 60k-290k tokens after which compiling paid back on each CPU kind measured
# the methods whose training under compiled layers is tested against eager (tests/test_compiled_layers.py)
AUTO_METHODS = frozenset({"lora", "rslora", "dora", "mora", "qlora", "full", "prefix"})


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """The decoder's layers and its final norm (when it has one)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError(
            f"compile_layers: {type(model).__name__} has no decoder with a `layers` list to compile",
            field="compile_layers",
        )
    norm = getattr(decoder, "norm", None)
    return [*layers, *([norm] if isinstance(norm, nn.Module) else [])]


def why_not_compilable(model: nn.Module) -> str | None:
    """Why `model` has nothing to compile (GPT-2 and Falcon keep their blocks in `transformer.h`), or None."""
    try:
        compile_targets(model)
    except ConfigError:
        return f"{type(model).__name__} has no decoder with a `layers` list"
    return None


def install(model: nn.Module) -> Callable[[], None]:
    """Compile each target in place (lazily: the work happens in the first forward); returns `restore`."""
    targets = compile_targets(model)
    for module in targets:
        module.compile(dynamic=True, options=OPTIONS)

    def restore() -> None:
        for module in targets:
            module._compiled_call_impl = None  # nn.Module.compile's own slot: the eager call again

    return restore


@functools.cache
def compiler_problem() -> str | None:
    """Why torch.compile cannot run here (no C++ compiler, an unsupported platform), or None if it can: a tiny
    function compiled forward and backward once a process, before auto counts on it."""
    try:
        x = torch.randn(4, 8, requires_grad=True)
        torch.compile(lambda t: torch.nn.functional.silu(t) * t)(x).sum().backward()
    except Exception as exc:  # inductor raises many kinds
        return f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


def auto_declines(
    cfg, *, device: torch.device, distributed: bool, methods: list[str], planned_tokens: int, moe: bool
) -> str | None:
    """For `compile_layers: auto`: why this run stays eager, or None when it compiles. The combinations that
    `true` refuses (see `check`) simply stay eager."""
    if device.type != "cpu":
        return "measured on CPU only"
    if distributed:
        return "several processes"
    if cfg.fused_update or cfg.gradient_checkpointing or cfg.fused_norms == "on":
        return "fused_update, gradient_checkpointing or fused_norms: on"
    if moe:
        return "an upcycled (MoE) model"
    if untested := sorted(set(methods) - AUTO_METHODS):
        return f"method(s) {', '.join(untested)} not tested under compiled layers"
    if planned_tokens < AUTO_MIN_TOKENS:
        return f"{planned_tokens:,} tokens planned, fewer than the {AUTO_MIN_TOKENS:,} that repay compiling"
    return compiler_problem()


def failure_message(exc: Exception, setting: bool | str) -> str:
    """One line for a compilation that failed inside training, naming the way out."""
    cause = getattr(exc, "inner_exception", None) or exc  # the backend's own error (a compiler missing, say)
    first = (str(cause).strip().splitlines() or [""])[0][:200]
    how = "compile_layers: auto chose to compile this run" if setting == "auto" else "compile_layers: true"
    return f"compiling the decoder layers failed ({type(cause).__name__}: {first}); {how}: set compile_layers: false"


def check(cfg, *, distributed: bool) -> None:
    """Combinations not supported with `compile_layers: true`, refused before any weights load."""
    if cfg.compile_layers is not True:
        return
    clash = None
    if distributed:
        clash = "several processes (torchrun)"
    elif cfg.fused_update:
        clash = "fused_update (its hooks run inside backward)"
    elif cfg.gradient_checkpointing:
        clash = "gradient_checkpointing"
    elif cfg.fused_norms == "on":
        clash = "fused_norms: on (compiled layers fuse the norms themselves; use fused_norms: auto)"
    if clash:
        raise ConfigError(f"compile_layers: true cannot run with {clash}", field="compile_layers")
