"""`deltatune train`: the whole training loop, readable top to bottom.

Order of events: load model -> apply methods -> prepare data -> (resume) -> for each optimizer
step: collate micro-batches with the step's loss policy, forward to the final hidden states,
chunked weighted loss normalised by the accumulated batch's total weight, backward, clip,
step -> evaluate / checkpoint when due -> save the final adapter or model.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from deltatune.config import TrainConfig
from deltatune.data.packing import additive_mask
from deltatune.errors import ConfigError, TrainingError
from deltatune.fileio import write_text_atomic
from deltatune.methods.virtual_tokens import prepended_tokens
from deltatune.train import compiled_layers, fused_norms, host_memory, packed_attention
from deltatune.train.checkpoint import Position, list_checkpoints, prune_checkpoints
from deltatune.train.distributed import NullProgress, init_distributed
from deltatune.train.loss import LogitTransform, logit_transform, per_example_weights, weighted_lm_loss_sum
from deltatune.train.optim import build_optimizer, build_scheduler, reschedule
from deltatune.train.progress import Progress
from deltatune.train.snapshot import drop_snapshots_after, save_snapshot
from deltatune.train.workspace import release_all as release_workspaces
from deltatune.upcycle.moe import moe_blocks, routed_tokens


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    tokens_per_s: float
    real_tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# set-up helpers
# ---------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """auto = CUDA where available, else CPU; a device this machine lacks is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N", field="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}': CUDA is not available on this machine; use cpu or auto", field="device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)", field="device"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N", field="device")
    return device


def check_switch_point(
    policy, total_steps: int, micro_before_epoch: Callable[[int], float], grad_accum: int = 1
) -> None:
    """A two-phase policy whose switch comes at or after the last step would never run its second phase.
    An epoch switch takes effect at the epoch's first micro-batch, inside the step that holds it (0-based step:
    the micro-batches of the epochs before it // grad_accum), as the loop applies it."""
    from deltatune.data.masking import PolicySchedule

    if not isinstance(policy, PolicySchedule):
        return
    if policy.switch_step is not None:
        at = policy.switch_step
    else:
        at = int(micro_before_epoch(policy.switch_epoch)) // grad_accum
    if at >= total_steps:
        raise ConfigError(
            f"the two-phase policy switches at step {at}, but the run has {total_steps} steps: its "
            f"second phase would never run",
            field="policy",
        )


def epoch_steps(micro_batches: float, grad_accum: int) -> int:
    """Optimizer steps for the micro-batches of some passes (`MicroBatches.in_epochs`), grouped by `grad_accum`.

    Steps read on across epochs, so rounding each epoch up to whole steps (ceil(micro / accum) x epochs)
    trained up to twice the epochs asked for (3 epochs of 9 micro-batches at grad_accum 8: 6 steps, 5.3
    passes). Rounded to 9 decimals first so that 0.7 x 10 (7.000000000000001 in floats) is 7 steps, not 8."""
    return max(1, math.ceil(round(micro_batches / grad_accum, 9)))


def pick_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else "fp32"


EMULATED_BF16_WARNING = (
    "warning: precision bf16 on a CPU without AVX-512 bf16 or AMX: its bf16 matmuls are emulated, many times "
    "slower than fp32 (1.9 against 63 GFLOP/s measured on an AVX2-only EPYC); precision auto picks fp32 here"
)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def method_specs(cfg: TrainConfig):
    from deltatune.methods.specs import specs_from_config

    return specs_from_config(cfg)


def method_objects(cfg: TrainConfig):
    """The configured methods, options checked, before any model exists (to read their capabilities)."""
    from deltatune.methods.specs import build_methods

    return build_methods(method_specs(cfg))


POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")  # GPT-2, OPT / BioGPT, GPT-J-style names


def check_position_table(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """One line for rows longer than a learned position table (GPT-2's 1,024 `n_positions`, or a small model's
    128): a position past it has no embedding, and the first forward stopped with an IndexError traceback. Models
    with rotary or ALiBi positions have no table and are not limited here."""
    import torch.nn as nn

    virtual = sum(getattr(m, "p", 0) for m in method_objects(cfg) if m.adds_virtual_tokens)  # they shift positions
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            limit = module.num_embeddings - int(getattr(module, "offset", 0))  # OPT's and BioGPT's offset of 2
            if cfg.row_len + virtual > limit:
                field = "pack_len" if cfg.pack_len else "seq_len"
                also = f" with the method's {virtual} virtual tokens" if virtual else ""
                raise ConfigError(
                    f"{field} {cfg.row_len}{also} is longer than the model's {limit} learned positions ({name}); "
                    f"set {field} to {limit - virtual} or less",
                    field=field,
                )


def forward_hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] for the batch's tokens (wrappers such as DDP provide their own)."""
    kwargs = dict(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    )
    if hasattr(model, "forward_hidden"):
        return model.forward_hidden(**kwargs)
    if batch["attention_mask"] is None:  # a flat row of packed examples: attention span by span
        if not packed_attention.is_active(model):
            raise TrainingError("a flat packed batch needs the model switched to packed attention")
        kwargs["packed_spans"] = packed_attention.spans_argument(model, batch["position_ids"])
    elif _adds_its_mask(model):
        mask = batch["attention_mask"]
        if isinstance(mask, dict):  # one mask per layer type (sliding and full layers)
            kwargs["attention_mask"] = {kind: additive_mask(m) for kind, m in mask.items()}
        elif mask.dim() == 4:
            kwargs["attention_mask"] = additive_mask(mask)
    return model.get_decoder()(**kwargs, use_cache=False).last_hidden_state


def _adds_its_mask(model: torch.nn.Module) -> bool:
    """Whether the model's attention adds a 4D mask to its scores (eager attention: Gemma2, or any model loaded
    with it) instead of reading a boolean one (SDPA, flex): a boolean block-diagonal mask added as 0/1 masked
    nothing, and packed rows attended across their examples."""
    return getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "flex_attention")


def use_packed_attention(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> bool:
    """Resolve `attention`: packed (span by span, no padding) or the block-diagonal mask."""
    if not cfg.packing or cfg.attention == "mask":
        return False
    why_not = None
    virtual = [m.name for m in method_objects(cfg) if m.adds_virtual_tokens]
    if virtual:
        why_not = f"method(s) {', '.join(virtual)} add virtual positions that every example attends to"
    elif not packed_attention.supported(model):
        why_not = packed_attention.unsupported_reason(model)
    elif attention_dropout(model):
        why_not = "the model uses attention dropout"
    if cfg.attention == "packed" and why_not:
        raise ConfigError(f"attention: packed is not available: {why_not}; use attention: mask", field="attention")
    # on CUDA, SDPA's fused kernels with the mask beat a loop of small matmuls (auto keeps them)
    return why_not is None and (cfg.attention == "packed" or device.type == "cpu")


def attention_dropout(model: torch.nn.Module) -> float:
    """The model's dropout on attention probabilities, under the names configs give it (Llama's
    `attention_dropout`, GPT-2's and GPT-J's `attn_pdrop`, BERT-style `attention_probs_dropout_prob`)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    names = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")
    return max(float(getattr(config, name, 0.0) or 0.0) for name in names)


def use_compiled_layers(
    cfg: TrainConfig,
    model: torch.nn.Module,
    methods: list,
    device: torch.device,
    *,
    distributed: bool,
    planned_tokens: int,
    resumed: bool | None,
    say: Callable[[str], None],
) -> bool:
    """Resolve `compile_layers`: true and false as given; auto as the resumed checkpoint ran (`resumed`), else
    by compiled_layers.auto_declines."""
    if cfg.compile_layers != "auto":
        return bool(cfg.compile_layers)
    if resumed is not None:
        if resumed and distributed:  # torchrun never compiles them (compiled_layers.check); auto must not either
            say(
                "compiled decoder layers: off under torchrun (the checkpoint ran them compiled; eager computes the "
                "same step within rounding)"
            )
            return False
        if resumed:
            say("compiled decoder layers: on, as in the checkpoint (compile_layers: auto)")
        return resumed

    why_not = compiled_layers.auto_declines(
        cfg,
        device=device,
        distributed=distributed,
        methods=[m.name for m in methods],
        planned_tokens=planned_tokens,
        moe=bool(moe_blocks(model)),
    ) or compiled_layers.why_not_compilable(model)
    if why_not is None:
        say(
            f"compiled decoder layers: on ({planned_tokens:,} tokens planned; the first step compiles, 10-60 s; "
            "compile_layers: false keeps the eager step)"
        )
    return why_not is None


def use_fused_norms(
    cfg: TrainConfig,
    model: torch.nn.Module,
    device: torch.device,
    *,
    distributed: bool,
    compiled: bool,
    say: Callable[[str], None],
) -> Callable[[], None]:
    """Resolve `fused_norms` and swap the norms in; returns the function that swaps them back.
    auto: single-process CPU runs (under FSDP2 the swapped modules' optimizer state did not map)."""
    if not (cfg.fused_norms == "on" or (cfg.fused_norms == "auto" and device.type == "cpu" and not distributed)):
        return lambda: None
    if compiled:  # `fused_norms: on` with compiled layers is refused (compiled_layers.check) or declined (auto)
        say("fused RMSNorm off: the compiled layers fuse the norms")
        return lambda: None
    from deltatune.train.lomo import retains_graph

    if retains_graph(cfg.fused_update, cfg.max_grad_norm):  # LOMO's clipping: two backward passes on one graph
        if cfg.fused_norms == "on":
            raise ConfigError(
                "fused_norms: on cannot run with LOMO's gradient clipping (two backward passes on one "
                "graph); use fused_norms: auto or off, or max_grad_norm: null",
                field="fused_norms",
            )
        say("fused RMSNorm off: LOMO's clipping runs backward twice on one graph")
        return lambda: None
    restore, why_not = fused_norms.install(model)  # compiles once (a few seconds)
    if why_not and cfg.fused_norms == "on":
        raise ConfigError(f"fused_norms: on is not available: {why_not}", field="fused_norms")
    if why_not:
        say(f"fused RMSNorm off: {why_not}")
    return restore


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing through transformers, which renamed it in 5.25 (the old
    `gradient_checkpointing_enable` warns there and goes in v6)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_outputs(adapted, path: Path, tokenizer, full: bool, base_name: str) -> None:
    """Full finetuning: a transformers folder. Adapter methods: the adapter (PEFT format where PEFT
    has the method) plus the tokenizer, so `deltatune generate --adapter` needs nothing else."""
    from deltatune.models import save_model

    if path.name == "final":  # each method's after-training hook, e.g. prefix tuning folds its MLP
        adapted.finalize()
    if full:
        model = adapted.model
        if not all(m.trains_full_weights for m in adapted.methods):  # e.g. ReMoRA: fold the live adapter in a copy
            import copy

            model = copy.deepcopy(adapted).merge_and_unload()
        save_model(model, tokenizer, path)
    else:  # adapter and tokenizer in one temporary folder renamed into place: never one without the other
        from deltatune.fileio import atomic_dir

        with atomic_dir(path) as tmp:
            adapted.save_adapter(tmp, base_model_name_or_path=base_name)
            tokenizer.save_pretrained(tmp)


def carry_training_template(tokenizer, template: str, warn: Callable[[str], None]) -> None:
    """Give the tokenizer saved with the output the training template as its chat template (a base model's
    tokenizer has none, and `--template chatml` on a model with its own renders other prompts), so inference
    in deltatune and elsewhere prompts the model as it was trained."""
    from deltatune.data.templates import training_chat_template

    chat_template, mismatch = training_chat_template(template, tokenizer)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if mismatch:
        warn(f"warning: {mismatch}")


def after_step_hooks(adapted, optimizer, step: int) -> None:
    """Each method's `after_step` hook (ReMoRA merges and restarts its adapter: its optimizer state is
    reset), then each method's learning-rate factor for the next step (ReMoRA's re-warmup)."""
    for method in adapted.methods:
        for p in method.after_step(adapted.model, step):
            optimizer.state.pop(p, None)
    apply_method_lr_factors(adapted, optimizer, step + 1)


def apply_method_lr_factors(adapted, optimizer, step: int) -> None:
    """Multiply the scheduled rate of `step` (1-based: the step about to run) by each method's factor."""
    factor = 1.0
    for method in adapted.methods:
        factor *= method.lr_factor(step)
    if factor != 1.0:  # LambdaLR recomputes from base_lrs each step, so the factor never compounds
        for group in optimizer.param_groups:
            group["lr"] *= factor


class MicroBatches:
    """Deterministic data order: epoch e is packed with seed+e; a position (epoch, micro) is enough to resume."""

    def __init__(self, examples: list, cfg: TrainConfig) -> None:
        self.examples, self.cfg = examples, cfg
        self._epoch, self._batches = -1, []

    def epoch_batches(self, epoch: int) -> list[list]:
        if epoch != self._epoch:
            from deltatune.data.packing import pack_examples

            if self.cfg.packing:
                rows = pack_examples(self.examples, self.cfg.row_len, shuffle_seed=self.cfg.seed + epoch)
            else:
                order = list(range(len(self.examples)))
                random.Random(self.cfg.seed + epoch).shuffle(order)
                rows = [self.examples[i] for i in order]
            bs = self.cfg.batch_size
            self._batches = [rows[i : i + bs] for i in range(0, len(rows), bs)]
            self._epoch = epoch
        return self._batches

    def per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def in_epochs(self, epochs: float) -> float:
        """Micro-batches in the first `epochs` passes (a fraction of the last). Each epoch is packed after its own
        shuffle, so their counts differ by a few rows: epoch 0's count times `epochs` stopped a 2-epoch run
        before the end of its second pass, or ran on into a third."""
        whole = int(round(epochs, 9))
        part = round(epochs - whole, 9)
        total = sum(len(self.epoch_batches(e)) for e in range(whole))
        if part > 0:
            total += part * len(self.epoch_batches(whole))
        self.epoch_batches(0)  # the cache holds the epoch training starts with
        return total

    def take(self, pos: Position, n: int) -> list[list]:
        """The next `n` micro-batches from `pos` (crossing into the next epoch if needed); advances pos."""
        out = []
        for _ in range(n):
            batches = self.epoch_batches(pos.epoch)
            if pos.micro >= len(batches):
                pos.epoch, pos.micro = pos.epoch + 1, 0
                batches = self.epoch_batches(pos.epoch)
            out.append(batches[pos.micro])
            pos.micro += 1
        return out


class MaskWindow(NamedTuple):
    """A sliding window the packed rows' mask must carry, in every layer or in some (Gemma2/3)."""

    window: int
    every_layer: bool


def batch_of(rows: list, policy, cfg: TrainConfig, pad_id: int, flat: bool, window: MaskWindow | None = None) -> dict:
    """One batch of packed rows (or examples) under `policy`, as this run's settings lay it out."""
    from deltatune.data.packing import collate

    return collate(
        rows,
        policy,
        seq_len=cfg.row_len,
        pad_id=pad_id,
        packed=cfg.packing,
        template_name=cfg.template,
        flat=flat,
        window=window.window if window else None,
        window_layers="all" if window is None or window.every_layer else "some",
    )


def mask_window(cfg: TrainConfig, model: torch.nn.Module, flat: bool) -> MaskWindow | None:
    """The sliding window packed rows' block-diagonal mask must carry (transformers uses a 4D mask as given, so
    a sliding-window model attended past its window), or None. A model that mixes sliding and full layers gets
    one mask per layer type (transformers takes the mapping as given)."""
    if flat or not cfg.packing:
        return None  # span-by-span attention applies the window itself; padded rows get transformers' own mask
    window, every_layer = packed_attention.sliding_window_of(model)
    if window is None or window >= cfg.row_len:
        return None
    return MaskWindow(window, every_layer)


def _to_device(batch: dict, device: torch.device) -> dict:
    def move(v):
        if isinstance(v, dict):  # a mask per layer type
            return {k: move(x) for k, x in v.items()}
        return v.to(device, non_blocking=True) if torch.is_tensor(v) else v

    return {k: move(v) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(
    model,
    head,
    examples: list,
    policy,
    cfg: TrainConfig,
    pad_id: int,
    device,
    autocast,
    flat: bool = False,
    transform: LogitTransform | None = None,
    window: MaskWindow | None = None,
    head_dtype: torch.dtype | None = None,
    bar: str | None = None,
) -> float | None:
    """Weighted loss per loss-bearing token on held-out examples (same template, policy and head precision).
    `bar`: a progress bar of that name over the batches, on a terminal (a final evaluation can take minutes)."""
    if not examples:
        return None
    from deltatune.data.packing import pack_examples

    was_training = model.training
    model.eval()
    rows = pack_examples(examples, cfg.row_len) if cfg.packing else examples
    moe = [b for _, b in moe_blocks(model)]  # upcycled models route the real tokens only
    virtual = prepended_tokens(model)  # ... and prompt tuning's virtual ones
    total, weight = 0.0, 0.0
    starts = range(0, len(rows), cfg.batch_size)
    if bar is not None:
        from tqdm import tqdm

        starts = tqdm(starts, desc=bar, unit="batch", leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())
    for i in starts:
        try:
            batch = batch_of(rows[i : i + cfg.batch_size], policy, cfg, pad_id, flat, window)
        except TrainingError:
            continue  # an eval batch with no loss-bearing token adds nothing
        batch = _to_device(batch, device)
        with autocast(), routed_tokens(moe, batch.get("token_mask"), virtual):
            hidden = forward_hidden(model, batch)
        s, w = weighted_lm_loss_sum(
            hidden,
            head,
            batch["input_ids"],
            batch["loss_weights"],
            chunk=cfg.loss_chunk,
            compute_dtype=head_dtype,
            transform=transform,
        )
        total += s.item()
        weight += w.item()
    model.train(was_training)
    return total / weight if weight > 0 else None


def _call_step_hook(hook, step: int, total_steps: int, model, flat: bool, autocast) -> dict:
    """Call a caller's per-step hook with the model in eval mode, standard attention and the run's autocast,
    so it can generate or score; training mode and packed attention come back afterwards. Compiled code
    (the fused norms, compiled layers) runs eagerly inside: generation's many shapes would each recompile."""
    was_training = model.training
    attention = packed_attention.attention_name(model)
    model.eval()
    if flat:
        model.set_attn_implementation("sdpa")
    try:
        with autocast(), torch.compiler.set_stance("force_eager"):
            return dict(hook(step, total_steps, model) or {})
    finally:
        if flat:
            model.set_attn_implementation(attention)
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def train(
    cfg: TrainConfig,
    *,
    quiet: bool = False,
    records: list[dict] | None = None,
    eval_records: list[dict] | None = None,
    on_step: Callable[[int, int, torch.nn.Module], dict | None] | None = None,
) -> TrainResult:
    """Run (or resume) a finetune. `records` lets a caller (the demo, tests) pass data in memory.
    `on_step(step, total_steps, model)` runs after every optimizer step (see `_call_step_hook`); what it
    returns is added to that step's metrics.jsonl record (experiments measure the model mid-run).

    However the run ends (finished, a NaN loss, Ctrl-C, an exception), its cleanup runs: the norms and
    the attention implementation are restored, the workspaces released, the process group closed."""
    with ExitStack() as cleanup:
        return _train(cfg, cleanup, quiet=quiet, records=records, eval_records=eval_records, on_step=on_step)


def _close_process_group() -> None:
    """After a failure: leave the process group without the barrier a normal close waits at."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    cleanup: ExitStack,
    *,
    quiet: bool,
    records: list[dict] | None,
    eval_records: list[dict] | None,
    on_step: Callable[[int, int, torch.nn.Module], dict | None] | None,
) -> TrainResult:
    from deltatune.analysis.memory import parameter_report
    from deltatune.data.masking import PolicySchedule, parse_policy, turns_trained, unused_template_weight
    from deltatune.data.pipeline import no_examples_message, prepare_dataset, prepare_records
    from deltatune.methods import get_method
    from deltatune.methods.apply import apply_methods
    from deltatune.methods.inject import match_targets
    from deltatune.methods.specs import with_tokenizer
    from deltatune.models import (
        DEFAULT_MODEL,
        DEFAULT_MODEL_ALIASES,
        load_model,
        load_tokenizer,
        local_model_path,
        model_skeleton,
    )
    from deltatune.train.checkpoint import verify_checkpoint
    from deltatune.train.run_folder import (
        SUMMARY_FILE,
        best_eval_after,
        check_output_folder,
        compare_for_resume,
        compiled_layers_at,
        data_fingerprint,
        model_fingerprint,
        pick_checkpoint,
        record_config,
        save_run_config,
        start_output,
        tokens_fingerprint,
        truncate_metrics,
        write_summary,
    )

    # --- everything a user can get wrong is checked before weights load and before anything is written
    out = Path(cfg.output).expanduser()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    warn = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    device = pick_device(cfg.device)
    for name in cfg.method_names:
        get_method(name)
    parsed = parse_policy(cfg.policy)
    if records is None and not cfg.data:
        raise ConfigError("no training data: pass --data FILE", field="data")
    check_output_folder(
        cfg,
        reads={"model": str(local_model_path(cfg.model) or "") or None, "data": cfg.data, "eval data": cfg.eval_data},
    )
    fingerprint = data_fingerprint(cfg, records, eval_records)
    fingerprint["model"] = model_fingerprint(local_model_path(cfg.model))
    resume_from, resume_changes, config_history = None, {}, []
    if cfg.resume:
        resume_from, meta = pick_checkpoint(cfg, warn)
        resume_changes = compare_for_resume(cfg, meta, fingerprint)
        config_history = list(meta.get("history", []))
    if cfg.num_threads:
        cores = os.cpu_count() or 1
        if cfg.num_threads > 4 * cores:  # 100000 threads crashed the process (a segfault) after "interrupted"
            raise ConfigError(f"{cfg.num_threads} threads on a machine with {cores} cores", field="num_threads")
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    dist = init_distributed(device)  # torchrun: join the process group; device becomes cuda:LOCAL_RANK
    cleanup.callback(_close_process_group)
    compiled_layers.check(cfg, distributed=dist.active)
    device = dist.device
    precision = pick_precision(cfg, device)
    if resume_from is not None and cfg.precision == "auto" and meta.get("precision") in ("fp32", "bf16"):
        if meta["precision"] != precision:  # bf16 and fp32 steps differ: switching would break the exact resume
            say(
                f"precision auto resumes in {meta['precision']}, as the run was trained (here it would pick {precision})"
            )
        precision = meta["precision"]
    if precision == "bf16" and device.type == "cpu" and not _cpu_has_bf16():
        warn(EMULATED_BF16_WARNING)
    methods = method_objects(cfg)
    cannot_resume = [m for m in methods if m.why_not_resume]
    if resume_from is not None and cannot_resume:  # before the model loads
        raise ConfigError(
            f"method '{cannot_resume[0].name}' cannot resume from a checkpoint: {cannot_resume[0].why_not_resume}",
            field="resume",
        )
    if cfg.save_every and cannot_resume:  # its checkpoints could never be resumed: written for nothing
        raise ConfigError(
            f"method '{cannot_resume[0].name}' cannot resume from checkpoints ({cannot_resume[0].why_not_resume}); "
            "leave save_every unset (Ctrl-C saves the model trained so far in final/)",
            field="save_every",
        )
    refusals = [f"{m.name}: {m.why_not_gradient_checkpointing}" for m in methods if m.why_not_gradient_checkpointing]
    if cfg.gradient_checkpointing and refusals:
        raise ConfigError(f"gradient_checkpointing cannot run with {refusals[0]}", field="gradient_checkpointing")
    full = any(m.writes_full_model for m in methods)  # the output is a whole model (full finetuning, ReMoRA)
    local_base = local_model_path(cfg.model) if str(cfg.model or "").lower() not in DEFAULT_MODEL_ALIASES else None
    base_name = str(local_base.resolve()) if local_base else (cfg.model or DEFAULT_MODEL)  # resolvable by load_model
    say = say if dist.is_main else (lambda *a: None)

    # --- data (read and validated before the model loads: a bad record costs seconds, not minutes)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    skeleton = model_skeleton(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if skeleton is not None and cfg.targets != "all-linear":  # targets name modules: check them on the skeleton
        match_targets(skeleton, cfg.targets, accept=lambda m: True)
    if skeleton is not None:
        check_position_table(skeleton, cfg)
    del skeleton
    data_kwargs = dict(
        template=cfg.template,
        data_format=cfg.data_format,
        column_map=cfg.column_map or None,
        max_len=cfg.seq_len,
        overflow=cfg.overflow,
        skip_bad=cfg.skip_bad,
        system_prompt=cfg.system_prompt,
        turns=turns_trained(parsed),
    )
    if records is not None:
        prepared = prepare_records(records, tokenizer, **data_kwargs)
    else:
        prepared = prepare_dataset(cfg.data, tokenizer, **data_kwargs)
    say(f"data: {prepared.report.summary()}")
    if prepared.report.special_in_content and dist.is_main:  # shown under --quiet too: it changes what trains
        report = prepared.report
        warn(
            f"warning: {report.special_in_content} record(s) hold a special token's text in their content, "
            f"tokenized as that token (first: {report.first_special})"
        )
    unused = unused_template_weight(prepared.examples, parsed, prepared.template)
    if unused and dist.is_main:
        warn(unused)
    # what the model reads, after the tokenizer and template at the model's path: another tokenizer or chat template
    # there trains on other tokens from the same records (the files' bytes change with every re-save; the tokens not)
    fingerprint["tokens"] = tokens_fingerprint(prepared.examples)
    if resume_from is not None and (meta.get("data_sha256") or {}).get("tokens") not in (None, fingerprint["tokens"]):
        raise ConfigError(
            f"{cfg.output} was trained on other tokens from this data: the tokenizer or chat template at "
            f"{cfg.model or 'the default model'} changed since the checkpoint; put it back or start a new --output",
            field="resume",
        )
    examples = list(prepared.examples)
    if eval_records is not None:
        eval_examples = list(prepare_records(eval_records, tokenizer, **data_kwargs).examples)
    elif cfg.eval_data:
        eval_examples = list(prepare_dataset(cfg.eval_data, tokenizer, **data_kwargs).examples)
    else:
        order = list(range(len(examples)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = min(cfg.eval_max_examples, int(len(examples) * cfg.eval_fraction))
        eval_examples = [examples[i] for i in order[:n_eval]]
        held = set(order[:n_eval])
        examples = [e for i, e in enumerate(examples) if i not in held]
    if not examples:
        raise ConfigError(no_examples_message(cfg.data if records is None else None, prepared.report), field="data")
    if cfg.eval_every and not eval_examples:  # it evaluated nothing, wrote no eval_loss and no best/, silently
        held_out = (
            "eval_data holds no usable example"
            if (cfg.eval_data or eval_records is not None)
            else (f"eval_fraction {cfg.eval_fraction:g} of {len(examples)} examples holds none")
        )
        raise ConfigError(
            f"is set, but {held_out}: raise eval_fraction, give eval_data, or leave eval_every unset",
            field="eval_every",
        )
    schedule = parsed if isinstance(parsed, PolicySchedule) else PolicySchedule(parsed, parsed, switch_step=0)
    eval_policy = schedule.policy_at(10**12, 10**12)  # held-out loss uses the policy training ends with
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = MicroBatches(examples, dist.global_config(cfg))  # global micro-batches: world x batch_size rows
    total_steps = cfg.steps or epoch_steps(data.in_epochs(cfg.epochs), cfg.grad_accum)
    check_switch_point(parsed, total_steps, data.in_epochs, cfg.grad_accum)
    if resume_from is not None and meta["position"]["step"] > total_steps:  # nothing would train; final/ replaced
        done = meta["position"]["step"]
        raise ConfigError(
            f"{resume_from} is at step {done}, past this run's {total_steps} steps: resume with "
            f"{'steps' if cfg.steps else 'epochs'} that reach step {done} at least",
            field="steps" if cfg.steps else "epochs",
        )

    # --- model and method ------------------------------------------------------------------
    # adapter methods keep frozen weights in bf16 (loaded so: no transient fp32 copy); trainable ones in fp32 below
    frozen_dtype = torch.bfloat16 if precision == "bf16" and not full else torch.float32
    model, tokenizer = load_model(cfg.model, dtype=frozen_dtype, trust_remote_code=cfg.trust_remote_code)
    if fingerprint["model"] is None:  # the default model is converted at its first load
        fingerprint["model"] = model_fingerprint(local_model_path(cfg.model))
    if prepared.data_format != "text":  # plain documents use no template: the tokenizer stays as it came
        carry_training_template(tokenizer, prepared.template, warn if dist.is_main else lambda line: None)
    adapted = apply_methods(model, with_tokenizer(method_specs(cfg), tokenizer))  # text inits need it
    model = adapted.model
    if dist.is_main:
        from deltatune.methods.specs import split_methods, unused_fields

        given = set(cfg.model_fields_set)  # keys the config file or the flags set
        for line in unused_fields(split_methods(cfg.method), given, cfg.model_dump()):
            warn(f"warning: {line}")
        for method in adapted.methods:
            for line in method.training_warnings(model):
                warn(f"warning: {line}")
    trainable = adapted.trainable_parameters()
    if not trainable:
        raise ConfigError(f"method '{cfg.method}' left nothing to train with targets '{cfg.targets}'", field="method")
    with torch.no_grad():
        for _, p in trainable:
            p.data = p.data.float()  # fp32 master weights for whatever trains
    model.to(device)
    flat = use_packed_attention(cfg, model, device)  # examples end to end, attention span by span
    window = mask_window(cfg, model, flat)  # a sliding window the packed mask must carry, if any
    planned_tokens = sum(len(e) for e in examples) * total_steps * cfg.grad_accum // max(1, data.per_epoch())
    resumed_compiled = None if resume_from is None else compiled_layers_at(out, meta)
    compiled = use_compiled_layers(
        cfg,
        model,
        methods,
        device,
        distributed=dist.active,
        planned_tokens=planned_tokens,
        resumed=resumed_compiled,
        say=say,
    )
    attn_before = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if flat:
        model.set_attn_implementation(packed_attention.register(compiled_layers=compiled))
    restore_norms = use_fused_norms(cfg, model, device, distributed=dist.active, compiled=compiled, say=say)
    restore_layers = compiled_layers.install(model) if compiled else (lambda: None)

    def restore_model() -> None:  # idempotent: runs before the final save, and again on any exit
        if packed_attention.is_active(model):
            model.set_attn_implementation(attn_before)  # saved models and later use get the standard kernel
        restore_norms()  # the model object leaves with transformers' own modules
        restore_layers()  # ... and their eager calls
        release_workspaces()  # scratch buffers of the loss and the attention

    cleanup.callback(restore_model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    head = model.get_output_embeddings()
    transform = logit_transform(model)  # what the model does to the head's output (Gemma2's cap, Cohere's scale)
    runner, trainable = dist.wrap(model, trainable, full=all(m.trains_full_weights for m in methods))  # DDP / FSDP2
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    # The head's products in the precision autocast gives every other linear (the loss runs outside autocast): with
    # fp32 master weights (full finetuning) the final hidden state is fp32, and the head ran in fp32, 2-3x slower.
    head_dtype = torch.bfloat16 if precision == "bf16" else None
    from deltatune.upcycle.losses import for_training as moe_losses_for

    router_losses = moe_losses_for(model, cfg)  # upcycled models: aux losses + routing metrics; None if dense
    moe = router_losses.blocks if router_losses is not None else []  # they route the batch's real tokens only
    virtual = prepended_tokens(model)  # ... and prompt tuning's virtual ones
    if router_losses is not None and compiled:  # only `true` gets here (auto declines MoE models)
        raise ConfigError("compile_layers: true is not supported for upcycled (MoE) models", field="compile_layers")

    # --- optimiser, resume -----------------------------------------------------------------
    params = [p for _, p in trainable]
    if cfg.fused_update:  # each parameter is updated inside backward, its gradient freed at once
        from deltatune.train.lomo import build_fused

        fused = "lomo" if cfg.fused_update is True else cfg.fused_update
        if fused == "lomo" and "betas" in cfg.model_fields_set and dist.is_main:  # plain SGD: no moments to shape
            warn(
                "warning: betas are not used by fused_update lomo (SGD without moments); they shape fused-adamw's moments"
            )
        optimizer = build_fused(
            fused,
            params,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=cfg.betas,
            max_norm=cfg.max_grad_norm,
        )
    else:
        optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    pos = Position()
    if resume_from is not None:
        # the names and shapes of what trains must be the checkpoint's, on every rank alike (each reads the same
        # files; under torchrun a mismatch was a copy_ traceback, or a silent broadcast where a dimension was 1)
        why = verify_checkpoint(resume_from, {n: tuple(p.shape) for n, p in trainable}, hashes=False)
        if why:
            raise ConfigError(f"checkpoint {resume_from} {why}", field="resume")
        pos = dist.load_checkpoint(resume_from, runner, trainable, optimizer, scheduler, data)
        reschedule(optimizer, scheduler)  # this run's schedule: `steps` or `epochs` may have changed
        apply_method_lr_factors(adapted, optimizer, pos.step + 1)
        if router_losses is not None and meta.get("router_metrics"):  # routing metrics since the last log
            router_losses.load_state_dict(meta["router_metrics"])
        if resume_changes:
            config_history.append({"step": pos.step, "changes": resume_changes})
            say(
                "resume applies "
                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in resume_changes.items())
                + f" from step {pos.step}"
            )
        say(f"resumed from {resume_from} at step {pos.step}")
        # best/ may hold a step after the checkpoint's, whose eval the checkpoint never saw: without it, a worse
        # eval of the resumed run replaced best/ (after a changed schedule the run trains those steps another way)
        later_best = best_eval_after(out / "metrics.jsonl", pos.step) if (out / "best").is_dir() else None
        if later_best is not None and (pos.best_eval is None or later_best[1] < pos.best_eval):
            pos.best_eval = later_best[1]
            if resume_changes:
                say(
                    f"best/ holds step {later_best[0]} of the run before this resume (eval loss {later_best[1]:.4f}); "
                    "it is replaced only by a lower eval loss"
                )
        dist.barrier()  # every rank read metrics.jsonl before the first one cuts it back
    else:
        dist.seed_own_streams(cfg.seed)  # several processes: other dropout masks for other rows
    if dist.is_main:  # training starts: only now does the output folder appear
        start_output(cfg)
        save_run_config(cfg, out, config_history)
        truncate_metrics(out / "metrics.jsonl", pos.step)
        (out / SUMMARY_FILE).unlink(missing_ok=True)  # an earlier finish's summary describes other weights
        if resume_from is not None:
            drop_snapshots_after(out, pos.step)
    dist.barrier()
    report = parameter_report(adapted)
    if dist.is_main:
        write_text_atomic(out / "parameters.json", json.dumps(report.to_dict(), indent=2))
    say(
        f"model: {report.total / 1e6:.1f}M parameters, training {report.trainable / 1e6:.3f}M "
        f"({report.percent:.3f}%) with {cfg.method}; {precision} on {device.type}; {len(examples)} train / "
        f"{len(eval_examples)} eval examples; {total_steps} steps"
    )

    progress_cls = Progress if dist.is_main else NullProgress  # rank 0 alone prints and writes metrics
    progress_shown = dist.is_main and not quiet

    def held_out_loss() -> float | None:  # the same evaluation every eval_every steps and at the end
        return evaluate_loss(
            runner,
            head,
            eval_examples,
            eval_policy,
            cfg,
            pad_id,
            device,
            autocast,
            flat,
            transform,
            window,
            head_dtype,
            bar="held-out loss" if progress_shown else None,
        )

    progress = progress_cls(
        total_steps,
        pos.step,
        out / "metrics.jsonl",
        log_every=cfg.log_every,
        enabled=not quiet,
        tensorboard_dir=out / "tensorboard",
    )
    interrupted = {"flag": False, "raise": False}
    # Ctrl-C, and SIGTERM (Slurm preemption, docker stop) outside torchrun, whose own shutdown sends it to every
    # worker: finish the step, save a checkpoint, then stop. Held until final/ is written: restored on any exit.
    stop_signals = [signal.SIGINT] + ([] if dist.active else [signal.SIGTERM])
    previous_handlers = {s: signal.getsignal(s) for s in stop_signals}

    def on_sigint(signum, frame):  # finish the step, save, then stop
        interrupted["flag"] = True
        if interrupted["raise"]:  # the final evaluation: stop it now (the weights are the last step's)
            raise KeyboardInterrupt

    for s in stop_signals:
        signal.signal(s, on_sigint)
    cleanup.callback(lambda: [signal.signal(s, h) for s, h in previous_handlers.items()])

    def checkpoint() -> None:
        dist.save_checkpoint(
            out / "checkpoints" / f"step-{pos.step:07d}",
            runner,
            trainable,
            optimizer,
            scheduler,
            pos,
            extra={
                "method": cfg.method,
                "config": record_config(cfg),
                "data_sha256": fingerprint,
                "history": config_history,
                "compiled_layers": compiled,  # what auto decided, for the resume (run_folder.compiled_layers_at)
                "precision": precision,  # likewise for precision auto
                "router_metrics": router_losses.state_dict() if router_losses is not None else None,
            },
        )
        if dist.is_main:
            prune_checkpoints(out, keep=2)

    def stop_interrupted(when: str) -> None:
        """Ctrl-C or SIGTERM: keep what was trained and stop (exit 130). A method that cannot resume from a
        checkpoint (ReMoRA merged into the base weights) gets the model trained so far in final/ instead."""
        cannot = [m for m in methods if m.why_not_resume]
        when = f" {when}" if when else ""
        if cannot:
            restore_model()
            dist.save_outputs(save_outputs, adapted, out / "final", tokenizer, full, base_name, runner)
            say(
                f"interrupted{when} at step {pos.step}; method '{cannot[0].name}' cannot resume "
                f"({cannot[0].why_not_resume}): the model trained so far is saved in {out / 'final'}"
            )
        else:
            checkpoint()
            say(f"interrupted{when} at step {pos.step}; checkpoint saved; continue with --resume")
        raise KeyboardInterrupt

    keep = cfg.keep_freed_memory == "on" or (cfg.keep_freed_memory == "auto" and device.type == "cpu")
    cleanup.enter_context(host_memory.kept(keep))  # steps reuse the pages earlier steps freed
    model.train()
    real_tokens, loss_value, eval_loss = 0, float("nan"), None
    history: list[dict] = []
    start = time.perf_counter()
    try:
        while pos.step < total_steps:
            micro = []  # this rank's share of each micro-batch
            for _ in range(cfg.grad_accum):
                rows = data.take(pos, 1)[0]
                # the policy of the epoch this micro-batch comes from (pos.epoch after taking it: a step that
                # starts at the end of an epoch reads the next one, and must use that epoch's policy)
                policy = schedule.policy_at(pos.step, pos.epoch)
                micro.append(
                    dist.local_batch(rows, lambda r, policy=policy: batch_of(r, policy, cfg, pad_id, flat, window))
                )
            if cfg.loss_reduction == "example":  # each example's weights sum to 1: a mean of per-example means
                for b in micro:
                    b["loss_weights"] = per_example_weights(b["loss_weights"], b["position_ids"])
            if cfg.loss_reduction == "count":  # over the tokens that carry any weight, not their weights' sum
                total_weight = sum(float((b["loss_weights"][:, 1:] > 0).sum()) for b in micro)
            else:
                total_weight = sum(float(b["loss_weights"][:, 1:].sum()) for b in micro)
            total_weight = dist.sum(total_weight)  # the global batch's weight normalises every rank's loss
            step_loss, aux_finite = 0.0, True
            for i, batch in enumerate(micro):
                batch = _to_device(batch, device)
                dist.sync_grads(runner, i == len(micro) - 1)  # gradients are summed over ranks once per step
                # MoE blocks route the real tokens only, also when checkpointing recomputes them in backward
                with routed_tokens(moe, batch.get("token_mask"), virtual):
                    with autocast():
                        hidden = forward_hidden(runner, batch)
                    loss_sum, _ = weighted_lm_loss_sum(
                        hidden,
                        head,
                        batch["input_ids"],
                        batch["loss_weights"],
                        chunk=cfg.loss_chunk,
                        compute_dtype=head_dtype,
                        transform=transform,
                    )
                    loss = loss_sum / total_weight
                    if router_losses is not None:  # MoE load-balancing and z-loss, averaged over micro-batches
                        aux = router_losses.collect()
                        aux_finite = aux_finite and bool(torch.isfinite(aux).all())
                        loss = loss + aux / len(micro)
                    if cfg.fused_update:
                        optimizer.backward(loss)  # LOMO: two passes when clipping
                    else:
                        loss.backward()
                step_loss += loss_sum.item()
                real_tokens += int(batch["n_real_tokens"])
            # with every rank's router-loss verdict in the same reduction: a rank that stopped alone left the
            # others waiting in the next collective
            step_loss, aux_bad = dist.sum(step_loss, float(not aux_finite))
            aux_finite = aux_bad == 0
            loss_value = step_loss / total_weight
            if not math.isfinite(loss_value) or not aux_finite:  # a NaN router loss poisons the gradients too
                kept = list_checkpoints(out) if dist.is_main else []
                where = f"; the last good checkpoint is {kept[-1]}" if kept else ""
                what = f"loss became {loss_value}" if aux_finite else "the MoE router loss became NaN or infinite"
                raise TrainingError(
                    f"{what} at step {pos.step + 1}{where} (lower --lr, check the data, or look "
                    "for NaN in the model's own outputs)"
                )
            if cfg.max_grad_norm and not cfg.fused_update:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr_used = optimizer.param_groups[0]["lr"]  # this step's rate (get_last_lr after the step is the next's)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pos.step += 1
            pos.loss = loss_value
            after_step_hooks(adapted, optimizer, pos.step)
            record = {"epoch": pos.epoch}
            if cfg.eval_every and pos.step % cfg.eval_every == 0:
                eval_loss = held_out_loss()
                if eval_loss is not None:
                    record.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
                    if pos.best_eval is None or eval_loss < pos.best_eval:
                        pos.best_eval = eval_loss
                        dist.save_outputs(save_outputs, adapted, out / "best", tokenizer, full, base_name, runner)
            if router_losses is not None and (pos.step % cfg.log_every == 0 or pos.step == total_steps):
                record.update(router_losses.summary())  # expert load, router entropy, drops, aux losses
            if on_step is not None:
                record.update(_call_step_hook(on_step, pos.step, total_steps, model, flat, autocast))
            progress.step(pos.step, loss_value, lr_used, int(sum(b["n_real_tokens"] for b in micro)), record)
            history.append({"step": pos.step, "loss": loss_value, **record})
            interrupted["flag"] = dist.any(interrupted["flag"])  # every rank stops at the same step
            if cfg.snapshot_every and pos.step % cfg.snapshot_every == 0:
                save_snapshot(out, pos.step, trainable, cfg.method, write=dist.is_main)
            if interrupted["flag"]:
                progress.close()
                stop_interrupted("")
            if cfg.save_every and pos.step % cfg.save_every == 0:
                checkpoint()
    # a compilation failed: with compiled layers on they are the only compiled code (the fused norms are off)
    except torch._dynamo.exc.TorchDynamoException as exc:
        if not compiled:
            raise
        raise TrainingError(compiled_layers.failure_message(exc, cfg.compile_layers)) from exc
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    interrupted["raise"] = not dist.active  # one process stops at once; ranks agree on it after the evaluation
    if eval_examples:  # after "eta 0s", minutes of silence looked like a hang
        say(f"final evaluation: held-out loss on {len(eval_examples)} examples")
    try:
        eval_loss = held_out_loss()
    except KeyboardInterrupt:
        interrupted["flag"] = True
    interrupted["raise"] = False
    if dist.any(interrupted["flag"]):  # the trained weights are kept before anything else is done
        stop_interrupted("during the final evaluation")
    restore_model()
    if cfg.save_every:
        checkpoint()
    dist.save_outputs(save_outputs, adapted, out / "final", tokenizer, full, base_name, runner)
    dist.close()
    if eval_loss is not None:
        say(f"final eval loss {eval_loss:.4f} (ppl {math.exp(min(eval_loss, 50)):.2f})")
    say(f"saved {out / 'final'}")
    result = TrainResult(
        output=out,
        steps=pos.step,
        final_loss=pos.loss if pos.loss is not None else loss_value,
        eval_loss=eval_loss,
        tokens_per_s=real_tokens / max(seconds, 1e-9),
        real_tokens=real_tokens,
        seconds=seconds,
        history=history,
    )
    if dist.is_main:  # the final evaluation was only printed: a script reading the run found no record of it
        write_summary(out, result, len(eval_examples), pos.best_eval if (out / "best").is_dir() else None)
    return result
