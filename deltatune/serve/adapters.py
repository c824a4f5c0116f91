"""Several named adapters on one frozen base model, chosen per batch row.

Every adapted linear of the model becomes a `MultiAdapterLinear`: the frozen base linear plus one
`DeltaLinear` per adapter that targets it, each built by the adapter's own method (so LoRA, DoRA, MoRA
and (IA)3 keep their own forward math) around the *same* base linear - no weight is copied. A shared
`Routing` says which adapter each batch row uses; each layer computes the base output once for the
whole batch and adds each adapter's change on the rows that name it:

- all rows name one adapter: that adapter's own `forward` (bit-for-bit what it computes alone);
- plain LoRA adapters in a mixed batch: one gathered computation for all of them, h = x A[row]^T and
  y += h (s B)[row]^T as two batched matmuls over per-row gathered A and s*B (ranks padded with zeros,
  a zero slot for rows without a LoRA adapter on this layer), so 16 distinct adapters cost two bmm;
- any other adapter (DoRA, MoRA, (IA)3): its `adapted_forward(x[rows], base_out[rows])` on its rows;
- prompt tuning: its virtual-token embeddings, which the engine places before the row's prompt.

Adapters are built without touching the served model: the method is applied to a *skeleton*, a tree of
empty modules with the model's module names whose leaves are the model's real linears, so the method's
own `apply` (target matching, option checks) and the adapter file reader run unchanged.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError, UserError
from deltatune.methods.base import DeltaLinear, MethodSpec, is_conv1d, linear_features
from deltatune.methods.lora import LoRALinear

SERVABLE_METHODS = ("lora", "rslora", "dora", "mora", "vera", "ia3", "prompt")
_WHY_NOT = {
    "prefix": "prefix tuning adds key/value prefixes to the attention cache, whose length differs per adapter, "
    "so rows of different adapters cannot share one cache; serve it alone with `deltatune generate`",
    "adapter": "bottleneck adapters insert modules after layers; merge is impossible and per-row routing is "
    "not implemented for them",
    "bitfit": "BitFit changes the base model's biases themselves, which every row shares; export a merged model",
    "full": "full finetuning changes the base weights themselves; serve it as its own model",
    "qlora": "QLoRA quantises the base layers it adapts, which every row shares; serve the LoRA weights on an "
    "unquantised base (method lora)",
}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class Routing:
    """Which adapter each row of the current batch uses (None = the base), shared by every layer.

    `rows is None` means every row uses `default` (the activated adapter, or None for the base)."""

    def __init__(self) -> None:
        self.rows: list[str | None] | None = None
        self.default: str | None = None
        self.version = 0  # one number per distinct routing, so layers can cache per-batch index tensors
        self._groups: dict[str | None, torch.Tensor] | None = None
        self._uniform: tuple[bool, str | None] = (True, None)
        self._known: dict[tuple, tuple[int, tuple[bool, str | None]]] = {}
        self._next = 0

    def set(self, rows: list[str | None] | None) -> None:
        """Route the next forward passes; the same rows again keep the same `version` (so the layers' cached
        index tensors survive from one decoding step to the next)."""
        self.rows = list(rows) if rows is not None else None
        key = (None if rows is None else tuple(rows), self.default)
        if key not in self._known:
            if len(self._known) > 256:
                self._known.clear()
            self._next += 1
            first = self.rows[0] if self.rows else None
            uniform = (
                (True, self.default)
                if self.rows is None
                else ((True, first) if all(r == first for r in self.rows) else (False, None))
            )
            self._known[key] = (self._next, uniform)
        self.version, self._uniform = self._known[key]
        self._groups = None

    def uniform(self) -> tuple[bool, str | None]:
        """(True, name) when every row uses the same adapter `name` (computed once per batch, not per layer)."""
        return self._uniform

    def groups(self) -> dict[str | None, torch.Tensor]:
        """Adapter name -> the indices of the rows that use it."""
        if self._groups is None:
            by: dict[str | None, list[int]] = {}
            for i, name in enumerate(self.rows or []):
                by.setdefault(name, []).append(i)
            self._groups = {k: torch.tensor(v, dtype=torch.long) for k, v in by.items()}
        return self._groups


class MultiAdapterLinear(nn.Module):
    """A frozen base linear plus any number of named adapters on it, applied per batch row."""

    def __init__(self, base: nn.Linear, routing: Routing) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.routing = routing
        self._stack_cache: tuple | None = None  # (A, sB, slot of name, zero slot) for plain LoRA adapters
        self._index_cache: tuple[int, torch.Tensor] | None = None
        self._plan_cache: tuple | None = None

    @property
    def in_features(self) -> int:
        return linear_features(self.base)[0]

    @property
    def out_features(self) -> int:
        return linear_features(self.base)[1]

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add(self, name: str, module: DeltaLinear) -> None:
        if module.base is not self.base:
            raise RuntimeError("an adapter must wrap this layer's own base linear")
        self.adapters[name] = module
        self._stack_cache = self._index_cache = self._plan_cache = None

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self._stack_cache = self._index_cache = self._plan_cache = None

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        same, name = self.routing.uniform()
        if same:
            if name is not None and name in self.adapters:
                return self.adapters[name](x)  # the adapter's own forward, exactly as when served alone
            return self.base(x)
        rows = len(self.routing.rows or ())
        if x.shape[0] != rows:
            return self._mixed(_by_row(x, rows)).reshape(*x.shape[:-1], -1)
        return self._mixed(x)

    def _mixed(self, x: torch.Tensor) -> torch.Tensor:
        """A batch whose rows name different adapters; x's first dimension is the batch row."""
        out = self.base(x)
        gathered, others = self._plan(x.device)
        result = out + self._gathered_lora(x).to(out.dtype) if gathered else out.clone() if others else out
        for n, rows in others:
            result.index_copy_(
                0, rows, self.adapters[n].adapted_forward(x.index_select(0, rows), out.index_select(0, rows))
            )
        return result

    def _plan(self, device: torch.device) -> tuple[bool, list[tuple[str, torch.Tensor]]]:
        """For this batch (cached per routing version): whether the gathered LoRA path runs (two or more
        plain LoRA adapters present), and the (adapter, rows) groups computed one adapter at a time."""
        version = self.routing.version
        if self._plan_cache is None or self._plan_cache[0] != version:
            groups = [
                (n, rows.to(device))
                for n, rows in self.routing.groups().items()
                if n is not None and n in self.adapters
            ]
            fast = [n for n, _ in groups if _stackable(self.adapters[n])]
            gathered = len(fast) >= 2
            others = [(n, rows) for n, rows in groups if not (gathered and n in fast)]
            self._plan_cache = (version, gathered, others)
        return self._plan_cache[1], self._plan_cache[2]

    def _gathered_lora(self, x: torch.Tensor) -> torch.Tensor:
        """sum over plain LoRA adapters of s B A x, each row with its own adapter, as two bmm."""
        a, sb, slot, zero = self._stack()
        version = self.routing.version
        if self._index_cache is None or self._index_cache[0] != version:
            idx = torch.tensor([slot.get(n, zero) for n in self.routing.rows], dtype=torch.long, device=x.device)
            self._index_cache = (version, idx)
        idx = self._index_cache[1]
        shape = x.shape
        xb = x.reshape(shape[0], -1, shape[-1]).to(a.dtype)  # (batch, tokens, d_in)
        h = torch.bmm(xb, a[idx].transpose(1, 2))  # (batch, tokens, r_max)
        y = torch.bmm(h, sb[idx].transpose(1, 2))  # (batch, tokens, d_out)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _stack(self) -> tuple:
        if self._stack_cache is None:
            names = [n for n, m in self.adapters.items() if _stackable(m)]
            mods = [self.adapters[n] for n in names]
            r_max = max(m.r for m in mods)
            dtype = mods[0].lora_A.weight.dtype
            if any(m.lora_A.weight.dtype != dtype for m in mods):
                dtype = torch.float32
            device = self.base.weight.device
            a = torch.zeros(len(mods) + 1, r_max, self.in_features, dtype=dtype, device=device)
            sb = torch.zeros(len(mods) + 1, self.out_features, r_max, dtype=dtype, device=device)
            with torch.no_grad():
                for i, m in enumerate(mods):
                    a[i, : m.r] = m.lora_A.weight.to(dtype)
                    sb[i, :, : m.r] = m.lora_B.weight.to(dtype) * m.scaling
            self._stack_cache = (a, sb, {n: i for i, n in enumerate(names)}, len(mods))
        return self._stack_cache

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


def _by_row(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x as (rows, tokens, features) when a module flattened the batch's tokens before this linear
    (`hidden.view(-1, d)`, as Qwen2-MoE's shared expert and its gate do), so that each token gets its own
    row's adapter instead of the adapter of the row at its flat index (or a shape error)."""
    if x.dim() != 2 or x.shape[0] % rows:
        raise RuntimeError(
            f"a linear got input of shape {tuple(x.shape)} for a batch of {rows} rows with different adapters; "
            "its tokens cannot be matched to their rows"
        )
    return x.reshape(rows, x.shape[0] // rows, x.shape[1])


def _stackable(module: DeltaLinear) -> bool:
    """Plain LoRA (not DoRA, which subclasses it) without dropout: its change is s B A x, nothing else."""
    return type(module) is LoRALinear and module.lora_dropout is None


@dataclass
class LoadedAdapter:
    name: str
    specs: list[MethodSpec]
    layers: list[str]  # qualified names of the MultiAdapterLinear layers it adapts
    source: str | None
    prompt: torch.Tensor | None = None  # prompt tuning's virtual-token embeddings (p, d_model), if any
    chat_template: str | None = None  # the one saved with it (its training template), rendered for its chats


class MultiAdapterModel:
    """A transformers causal LM serving several named adapters at once; `.model` stays a normal model.

    `load(name, folder)` / `add(name, specs, tensors)` / `unload(name)` manage adapters by name;
    `activate(name)` picks the adapter used when no per-row routing is given; `route(rows)` (a context
    manager) gives each batch row its own adapter (None = the base)."""

    def __init__(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, DeltaLinear):
                raise ConfigError(
                    f"module '{name}' already carries an adapter of method "
                    f"'{getattr(module, 'method_name', '?')}'; serve the plain base model and "
                    "load adapters by name",
                    field="model",
                )
        self.model = model
        self.routing = Routing()
        self.adapters: dict[str, LoadedAdapter] = {}
        _split_moe_blocks_by_adapter(model, self.routing)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    # --- loading ------------------------------------------------------------------------------
    def load(self, name: str, folder: str | os.PathLike) -> LoadedAdapter:
        """Load an adapter folder (PEFT's or deltatune's format; a PEFT `.bin` is read weights-only)
        under `name`, with the chat template saved beside it."""
        from deltatune.methods.peft_format import read_adapter
        from deltatune.models import saved_chat_template

        self._check_new_name(name)
        specs, tensors, peft_keys, source = read_adapter(folder)
        loaded = self.add(name, specs, tensors, peft_keys=bool(peft_keys), source=source)
        loaded.chat_template = saved_chat_template(folder)
        return loaded

    @torch.no_grad()
    def add(
        self,
        name: str,
        specs: list[MethodSpec],
        tensors: dict[str, torch.Tensor],
        *,
        peft_keys: bool = False,
        source: str | None = None,
    ) -> LoadedAdapter:
        """Build the adapter's modules from its specs and weights and attach them under `name`."""
        from deltatune.methods.apply import apply_methods, check_adapter_tensors, hold_in_saved_precision
        from deltatune.methods.peft_format import narrow_peft_targets

        self._check_new_name(name)
        for spec in specs:
            _check_servable(spec, source)
        tensors = dict(tensors)
        prompt = self._virtual_tokens(specs, tensors, peft_keys, source)
        linear_specs = [s for s in specs if s.name != "prompt"]
        built = []
        if linear_specs:
            skeleton = self._skeleton()
            if peft_keys:
                linear_specs = narrow_peft_targets(skeleton, linear_specs)
            check_adapter_tensors(skeleton, linear_specs, tensors, peft_keys=peft_keys, source=source)
            adapted = apply_methods(skeleton, linear_specs)
            if peft_keys:
                method = adapted.methods[0]
                tensors = {method.from_peft_key(k): v for k, v in tensors.items()}
            hold_in_saved_precision(adapted, tensors)  # as load_adapter: an fp32 adapter over a bf16 base
            adapted.load_adapter_state_dict(tensors, source=source)
            built = [(n, m) for n, m in skeleton.named_modules() if isinstance(m, DeltaLinear)]
        for _, module in built:
            module.requires_grad_(False)
            module.eval()
        layers = []
        for qualified, module in built:
            layer = self._layer(qualified, module.base)
            layer.add(name, module)
            layers.append(qualified)
        loaded = LoadedAdapter(name=name, specs=list(specs), layers=layers, source=source, prompt=prompt)
        self.adapters[name] = loaded
        self.routing.set(self.routing.rows)
        return loaded

    def unload(self, name: str) -> None:
        """Detach adapter `name` from every layer; a layer left with no adapter is its plain linear again."""
        if name not in self.adapters:
            raise UserError(
                f"no adapter named '{name}' is loaded; loaded: {', '.join(self.adapters) or 'none'}", field="adapter"
            )
        for qualified in self.adapters.pop(name).layers:
            layer = self.model.get_submodule(qualified)
            layer.remove(name)
            if not len(layer.adapters):
                _replace(self.model, qualified, layer.base)
        if self.routing.default == name:
            self.routing.default = None
        self.routing.set(self.routing.rows)

    def activate(self, name: str | None) -> None:
        """The adapter every row uses when no per-row routing is given (None: the base model)."""
        if name is not None and name not in self.adapters:
            raise UserError(f"no adapter named '{name}' is loaded", field="adapter")
        self.routing.default = name
        self.routing.set(self.routing.rows)

    @contextmanager
    def route(self, rows: list[str | None]) -> Iterator[None]:
        """Within the block, batch row i uses adapter rows[i] (None: the base)."""
        unknown = sorted({r for r in rows if r is not None and r not in self.adapters})
        if unknown:
            raise UserError(f"no adapter named '{unknown[0]}' is loaded", field="adapter")
        before = self.routing.rows
        self.routing.set(rows)
        try:
            yield
        finally:
            self.routing.set(before)

    def virtual_tokens(self, name: str | None) -> torch.Tensor | None:
        """The virtual-token embeddings that rows of adapter `name` start with (prompt tuning), or None."""
        loaded = self.adapters.get(name) if name is not None else None
        return None if loaded is None else loaded.prompt

    # --- internals ----------------------------------------------------------------------------
    def _virtual_tokens(
        self, specs: list[MethodSpec], tensors: dict[str, torch.Tensor], peft_keys: bool, source: str | None
    ) -> torch.Tensor | None:
        """Take prompt tuning's embeddings out of `tensors` (PEFT's or deltatune's key), checked against the model."""
        spec = next((s for s in specs if s.name == "prompt"), None)
        if spec is None:
            return None
        from deltatune.methods.prompt import PromptTuning

        key = "prompt_embeddings" if peft_keys else f"{PromptTuning.ATTR}.embedding"
        if key not in tensors:
            raise ConfigError(f"prompt-tuning adapter lacks the tensor '{key}'", file=source)
        value = tensors.pop(key)
        table = self.model.get_input_embeddings().weight
        p = int(spec.options.get("num_virtual_tokens", 20))
        if value.dim() != 2 or value.shape != (p, table.shape[1]):
            raise ConfigError(
                f"tensor '{key}' has shape {tuple(value.shape)}, the model expects ({p}, {table.shape[1]})", file=source
            )
        return value.to(device=table.device, dtype=table.dtype)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise UserError(
                f"adapter name {name!r} must be 1-128 letters, digits or ._:- (starting with a letter or digit)",
                field="name",
            )
        if name in self.adapters:
            raise UserError(f"an adapter named '{name}' is already loaded; unload it first", field="name")

    def _layer(self, qualified: str, base: nn.Module) -> MultiAdapterLinear:
        current = self.model.get_submodule(qualified)
        if isinstance(current, MultiAdapterLinear):
            return current
        if current is not base:
            raise RuntimeError(f"layer '{qualified}' changed while an adapter was being built")
        layer = MultiAdapterLinear(base, self.routing)
        _replace(self.model, qualified, layer)
        return layer

    def _skeleton(self) -> nn.Module:
        """Empty modules named like the model's, with the model's real linears as leaves."""
        root = nn.Module()
        root.config = getattr(self.model, "config", None)

        def walk(module: nn.Module, mirror: nn.Module) -> None:
            for child_name, child in module.named_children():
                if isinstance(child, MultiAdapterLinear):
                    mirror.add_module(child_name, child.base)
                elif isinstance(child, nn.Linear) or is_conv1d(child):  # Conv1D: GPT-2's transposed linear
                    mirror.add_module(child_name, child)
                elif any(True for _ in child.children()):
                    sub = nn.Module()
                    mirror.add_module(child_name, sub)
                    walk(child, sub)

        walk(self.model, root)
        return root


def _split_moe_blocks_by_adapter(model: nn.Module, routing: Routing) -> None:
    """Make each upcycled MoE block (at inference) run once per adapter group of a mixed batch, and an
    expert-choice block once per row.

    Inside a block, the router and the experts see tokens flattened and regrouped by expert, so their
    first dimension is not the batch row that `Routing` describes: a mixed batch whose adapters reach
    the router or the experts failed (or, where sizes matched, gave rows other rows' adapters). Run
    per group, every linear inside sees a uniform batch and computes the adapter's own forward; top-k
    routes each token on its own, so a row gets exactly what it gets alone. Expert choice ranks all the
    tokens it sees, so a row's text changed with the rest of its batch (and its padding): each row
    routes its own real tokens (the engine's `routed_tokens` mask), as when it is served alone."""
    from deltatune.upcycle.moe import moe_blocks

    for _, block in moe_blocks(model):
        block.forward = _per_group_forward(block, block.forward, routing)


def _per_group_forward(block: nn.Module, forward, routing: Routing):
    def run(hidden: torch.Tensor) -> torch.Tensor:
        per_row = block.router_type == "expert-choice"
        if block.training or not (per_row or _mixed_and_routed(block, routing)):
            return forward(hidden)
        names = routing.rows if routing.rows is not None else [routing.default] * hidden.shape[0]
        if per_row:
            groups = [(n, torch.tensor([i])) for i, n in enumerate(names)]
        else:
            groups = list(routing.groups().items())
        mask, rows_before, out = block.token_mask, routing.rows, None
        try:
            for name, rows in groups:
                rows = rows.to(hidden.device)
                routing.set([name] * len(rows))
                block.token_mask = None if mask is None else mask.index_select(0, rows)
                part = forward(hidden.index_select(0, rows))
                out = part.new_empty((hidden.shape[0], *part.shape[1:])) if out is None else out
                out.index_copy_(0, rows, part)
        finally:
            block.token_mask = mask
            routing.set(rows_before)
        return out

    return run


def _mixed_and_routed(block: nn.Module, routing: Routing) -> bool:
    """Whether the batch names several adapters and one of them reaches inside `block` (checked in that order:
    every decode step asks, and a uniform batch needs no walk over the block's modules)."""
    same, _ = routing.uniform()
    return not same and any(isinstance(m, MultiAdapterLinear) for m in block.modules())


def _check_servable(spec: MethodSpec, source: str | None) -> None:
    if spec.name not in SERVABLE_METHODS:
        why = _WHY_NOT.get(spec.name, "it is not a reparameterisation of linear layers")
        raise ConfigError(
            f"method '{spec.name}' cannot be served with other adapters in one batch: {why}",
            file=source,
            field="method",
        )
    if spec.options.get("quantize_base"):
        raise ConfigError(
            f"method '{spec.name}' with quantize_base quantises the shared base layers; serve the "
            "adapter on the unquantised base (drop quantize_base)",
            file=source,
            field="quantize_base",
        )
    if spec.dropout:
        spec.dropout = 0.0  # inference: dropout is the identity, and plain LoRA then takes the gathered path


def _replace(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
