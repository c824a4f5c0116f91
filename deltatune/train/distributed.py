"""Data-parallel training under torchrun: DDP for adapter methods, FSDP2 for full finetuning.

Started by torchrun (`torchrun --nproc_per_node N -m deltatune train ...`, or `deltatune train
--nproc N`), each process joins the group described by RANK / WORLD_SIZE / LOCAL_RANK; the backend
follows the device: gloo on CPU, NCCL on CUDA (each process on cuda:LOCAL_RANK). Without torchrun
(no RANK / WORLD_SIZE in the environment) every method here is a pass-through, so the single-process loop is unchanged.

What stays exactly as in one process (so results match a single run with batch_size x world):
- data: every rank builds the same global micro-batches (world x batch_size rows each); rank r
  computes rows r, r+world, r+2*world, ... of each (strided, so shares differ by at most one row).
  A rank whose share is empty or carries no loss runs one row with zero weight, so every rank does
  the same collectives.
- loss: each step divides by the GLOBAL loss weight of the accumulated batch (an all-reduce of the
  per-rank sums before backward), and gradients are SUMMED across ranks (a DDP communication hook
  that sums; FSDP2 with divide factor 1), so the gradient is that of the global loss.
- rank 0 alone logs, writes metrics, checkpoints and outputs; the others wait at a barrier. All
  ranks run evaluation (FSDP needs every rank in each forward); results are identical everywhere.

Checkpoints hold full tensors (FSDP gathers them to rank 0) in the single-process format, plus
the global batch they were written with; resuming with another process count works when the data
position falls on a batch boundary of the new global batch, and refuses with one line otherwise.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from deltatune.errors import ConfigError, TrainingError
from deltatune.train.optim import KERNEL_KEYS


@dataclass
class Distributed:
    """This process's place in the job; world == 1 means a plain single-process run."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False  # in a process group (launched by torchrun, even with one process)
    fsdp: bool = False
    _global_rows: int = 0  # rows per global micro-batch, set by global_config

    @property
    def enabled(self) -> bool:
        return self.active

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- set-up --------------------------------------------------------------------------
    def global_config(self, cfg):
        """The config whose batch_size is the global micro-batch (what a single run would use); that
        row count is also recorded in checkpoints, to map the data position on resume. Refuses the
        settings that cannot run data-parallel."""
        if self.enabled and cfg.fused_update:
            raise ConfigError(
                "fused_update (LOMO) updates each parameter inside backward, before gradients are "
                "summed across processes; it runs in one process only (drop it, or run without "
                "torchrun)",
                field="fused_update",
            )
        if self.enabled and cfg.fused_norms == "on":
            raise ConfigError(
                "fused_norms: on runs in one process only (the swapped-in norms' weights are not the ones DDP or "
                "FSDP syncs and saves); use fused_norms: auto, which several processes run without",
                field="fused_norms",
            )
        self._global_rows = cfg.batch_size * self.world
        return cfg if not self.enabled else cfg.model_copy(update={"batch_size": self._global_rows})

    def wrap(
        self, model: nn.Module, trainable: list[tuple[str, nn.Parameter]], *, full: bool
    ) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
        """(runner, trainable): `runner.forward_hidden(**batch)` runs the data-parallel forward.

        Adapter methods: DDP with summed gradients. Full finetuning: FSDP2, one unit per decoder
        layer plus a root unit (embeddings, norm, head); the trainable list is re-read because
        fully_shard replaces parameters with sharded DTensors (names are unchanged).
        """
        if not self.enabled:
            return model, trainable
        runner = HiddenForward(model)
        if full:
            self.fsdp = True
            return _shard_fsdp(runner, model), _by_name(model, [n for n, _ in trainable])
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # buffers (rotary tables) are the same everywhere: don't sync them every forward
        quiet_buffers = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )  # torch < 2.13
        from deltatune.upcycle.moe import moe_blocks

        ddp = _DDP(
            runner,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # an upcycled model's expert that no token of a rank's batch chose has no gradient there: DDP must
            # look for such parameters, or their gradients are never summed and the next step stops
            find_unused_parameters=bool(moe_blocks(model)),
            **quiet_buffers,
        )
        ddp.register_comm_hook(None, _sum_allreduce_hook)
        return ddp, trainable

    # --- per step ------------------------------------------------------------------------
    def local_batch(self, rows: Sequence[Any], make: Callable[[list], dict]) -> dict:
        """This rank's share of a global micro-batch, collated by `make` (collate with the step's policy).

        `n_real_tokens` is set to the global micro-batch's count so throughput figures are the job's.
        """
        if not self.enabled:
            return make(list(rows))
        mine = list(rows[self.rank :: self.world])
        try:
            batch = make(mine)
        except TrainingError:
            batch = make(list(rows))  # raises, as a single run would, if the whole batch carries no loss
            n = batch["input_ids"].shape[0]

            def first_row(v):
                if isinstance(v, dict):  # a mask per layer type
                    return {k: first_row(x) for k, x in v.items()}
                return v[:1] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v

            batch = {k: first_row(v) for k, v in batch.items()}
            batch["loss_weights"] = torch.zeros_like(batch["loss_weights"])
            # nor routed: an upcycled model's blocks counted the stand-in in the expert load and router losses
            batch["token_mask"] = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
        batch["n_real_tokens"] = sum(_n_tokens(r) for r in rows)
        return batch

    def sync_grads(self, runner: nn.Module, enabled: bool) -> None:
        """Communicate gradients in the next backward only if `enabled` (the last micro-batch of a step)."""
        if not self.enabled:
            return
        if self.fsdp:
            runner.set_requires_gradient_sync(enabled)
        else:
            runner.require_backward_grad_sync = enabled

    def sum(self, *values: float) -> float | tuple[float, ...]:
        """Sum of each value over ranks (float64)."""
        if self.enabled:
            import torch.distributed as dist

            t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
            dist.all_reduce(t)
            values = tuple(t.tolist())
        return values[0] if len(values) == 1 else values

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on one (so every rank stops at the same step on Ctrl-C)."""
        return bool(self.sum(float(flag)) > 0) if self.enabled else flag

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()

    # --- rank-0 output -------------------------------------------------------------------
    def save_checkpoint(
        self, path: Path, runner: nn.Module, trainable, optimizer, scheduler, position, extra: dict | None = None
    ) -> None:
        """The single-process checkpoint files, written by rank 0; FSDP gathers full tensors first."""
        from deltatune.train.checkpoint import save_checkpoint

        extra = {**(extra or {}), "global_batch_rows": self._global_rows, "world_size": self.world}
        if self.fsdp:
            weights, optim_state = _gather_fsdp(runner.module, trainable, optimizer)
            trainable, optimizer = list(weights.items()), _StateOnly(optim_state)
        rng_ranks = self._gather_rng_states() if self.enabled else None  # each process's dropout stream
        if self.is_main:
            save_checkpoint(path, trainable, optimizer, scheduler, position, extra=extra, rng_ranks=rng_ranks)
        self.barrier()

    def _gather_rng_states(self) -> list[dict]:
        import torch.distributed as dist

        from deltatune.train.checkpoint import _rng_state

        states: list = [None] * self.world
        dist.all_gather_object(states, _rng_state())
        return states

    def seed_own_streams(self, seed: int) -> None:
        """Several processes: each its own random streams from `seed`, so that dropout draws other masks for other
        rows, as one process does (every rank drew the same ones); one process keeps the stream it has, under torchrun
        too (re-seeding it made `--nproc 1` train another model than a plain run whenever dropout was on)."""
        if self.world > 1:
            mixed = (seed * 1_000_003 + self.rank) % 2**63
            torch.manual_seed(mixed)
            random.seed(mixed)

    def load_checkpoint(self, path: Path, runner: nn.Module, trainable, optimizer, scheduler, data):
        """Every rank reads the checkpoint (the output folder must be shared); returns the Position,
        mapped onto this run's global batch when the process count changed."""
        from deltatune.train.checkpoint import META_FILE, load_checkpoint

        if self.fsdp:
            position = _load_fsdp(
                path, runner.module, trainable, optimizer, scheduler, rank=self.rank, world=self.world
            )
        else:
            position = load_checkpoint(path, trainable, optimizer, scheduler, rank=self.rank, world=self.world)
        meta = json.loads((path / META_FILE).read_text())
        old_rows = meta.get("global_batch_rows") or self._global_rows  # older checkpoints: single process
        return remap_position(position, old_rows, data, path)

    def save_outputs(
        self,
        save: Callable[..., None],
        adapted,
        path: Path,
        tokenizer,
        full: bool,
        base_name: str,
        runner: nn.Module | None = None,
    ) -> None:
        """`save` (the loop's save_outputs) on rank 0; FSDP first gathers the model into a plain CPU copy."""
        if self.fsdp:
            from deltatune.models import save_model

            plain = _gather_plain_model(runner.module if runner is not None else adapted.model, adapted.model)
            if self.is_main:
                save_model(plain, tokenizer, path)
        elif self.is_main:
            save(adapted, path, tokenizer, full, base_name)
        self.barrier()

    # --- internals -----------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init_distributed(device: torch.device) -> Distributed:
    """Join torchrun's process group (gloo for CPU, NCCL for CUDA); a no-op without torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # not started by torchrun
        return Distributed(device=device)
    world = int(os.environ["WORLD_SIZE"])
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)  # one GPU per process; choose GPUs with CUDA_VISIBLE_DEVICES
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {device.type}", field="device")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return Distributed(device=device, rank=rank, world=world, local_rank=local, active=True)


def remap_position(position, old_rows: int, data, path: Path):
    """Carry a data position written with `old_rows` rows per global micro-batch over to `data`'s.

    Rows consumed within the epoch stay the same; the new micro index must land on a boundary.
    """
    new_rows = data.cfg.batch_size
    if old_rows == new_rows:
        return position
    epoch_rows = sum(len(b) for b in data.epoch_batches(position.epoch))
    done = min(position.micro * old_rows, epoch_rows)
    if done == epoch_rows:
        position.micro = len(data.epoch_batches(position.epoch))
    elif done % new_rows == 0:
        position.micro = done // new_rows
    else:
        raise ConfigError(
            f"{path} was written with {old_rows} rows per global micro-batch and stopped after "
            f"{done} rows of epoch {position.epoch}; {new_rows} rows per micro-batch (processes x "
            f"batch_size) does not divide that: resume with a process count and batch size whose "
            f"product divides {done}",
            field="batch_size",
        )
    return position


class NullProgress:
    """Progress for ranks other than 0: prints and writes nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def step(self, *args, **kwargs) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class HiddenForward(nn.Module):
    """The model's final hidden states as a module forward, so DDP/FSDP hooks see every forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, input_ids, attention_mask, position_ids):
        from deltatune.train.loop import forward_hidden

        return forward_hidden(
            self.module, dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        )

    def forward_hidden(self, **kwargs):
        return self(**kwargs)


def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    class DDPHidden(DistributedDataParallel):
        def forward_hidden(self, **kwargs):
            return self(**kwargs)

    return DDPHidden


def _DDP(*args, **kwargs):
    return _ddp_class()(*args, **kwargs)


def _sum_allreduce_hook(state, bucket):
    """DDP communication hook: SUM the bucket (DDP's default hook averages)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _n_tokens(row) -> int:
    return sum(len(ex) for ex in row) if isinstance(row, (list, tuple)) else len(row)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=[])
    return list(layers)


def _shard_fsdp(runner: HiddenForward, model: nn.Module) -> nn.Module:
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard

    for layer in _decoder_layers(model):
        fully_shard(layer)
    fully_shard(runner)  # root unit: embeddings (tied head), final norm, anything left
    for m in runner.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum, don't average: the loss is already globally normalised
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return runner


def _by_name(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Parameter]]:
    params = dict(model.named_parameters())
    return [(n, params[n]) for n in names]


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _gather_fsdp(model: nn.Module, trainable, optimizer) -> tuple[dict, dict]:
    """Full trainable tensors and the optimizer state, on rank 0's CPU, in single-process layout."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    osd = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    names = [n for n, _ in trainable]
    weights = {n: sd[n] for n in names if n in sd}
    return weights, _fqn_to_index(osd, optimizer, model) if osd.get("state") is not None else {}


def _group_names(optimizer, model: nn.Module) -> list[list[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return [[ids[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter (tied ones have several) -> the name named_parameters() gives it."""
    first: dict[int, str] = {}
    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out[n] = first.setdefault(id(p), n)
    return out


def _fqn_to_index(osd: dict, optimizer, model: nn.Module) -> dict:
    """torch.distributed.checkpoint's name-keyed optimizer state -> optimizer.state_dict()'s index-keyed one."""
    index = {n: i for i, n in enumerate(n for g in _group_names(optimizer, model) for n in g)}
    groups = []
    for g, names in zip(osd["param_groups"], _group_names(optimizer, model)):
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in names]})
    canonical = _canonical_names(model)
    return {"state": {index[canonical[n]]: s for n, s in osd["state"].items()}, "param_groups": groups}


def _index_to_fqn(state: dict, optimizer, model: nn.Module) -> dict:
    names = [n for g in _group_names(optimizer, model) for n in g]
    groups = []
    for g, gnames in zip(state["param_groups"], _group_names(optimizer, model)):
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(gnames)})
    return {"state": {names[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}


class _StateOnly:
    """Stands in for an optimizer whose state was gathered elsewhere (save_checkpoint calls state_dict())."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _load_fsdp(path: Path, model: nn.Module, trainable, optimizer, scheduler, *, rank: int, world: int):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from deltatune.train.checkpoint import META_FILE, STATE_FILE, WEIGHTS_FILE, Position, restore_rng

    weights = load_file(str(path / WEIGHTS_FILE))
    missing = {n for n, _ in trainable} - set(weights)
    if missing:
        raise ConfigError(
            f"checkpoint {path} lacks {sorted(missing)[:3]} (different method or targets?)", field="resume"
        )
    set_model_state_dict(model, weights, options=_full_options(strict=False))
    state = torch.load(path / STATE_FILE, weights_only=True)
    set_optimizer_state_dict(
        model, optimizer, _index_to_fqn(state["optimizer"], optimizer, model), options=_full_options()
    )
    kept = ("params", *KERNEL_KEYS)  # this run's fused/foreach choice, not the checkpoint's
    for group, saved in zip(optimizer.param_groups, state["optimizer"]["param_groups"]):
        group.update({k: v for k, v in saved.items() if k not in kept})  # keep hyperparameter types (betas tuple)
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state, rank, world)
    return Position(**json.loads((path / META_FILE).read_text())["position"])


def _gather_plain_model(sharded: nn.Module, template: nn.Module) -> nn.Module | None:
    """A plain CPU copy of an FSDP-sharded transformers model on rank 0 (None elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(sharded, options=_full_options(cpu_offload=True))
    if not sd:
        return None
    from deltatune.upcycle.convert import spec_of, upcycle

    with torch.device("meta"):
        plain = type(template)(template.config)
        spec = spec_of(template)
        if spec is not None:  # an upcycled model: its MoE blocks in place of the config's dense MLPs
            upcycle(plain, spec, copy_weights=False)
            from deltatune.upcycle.moe import moe_blocks

            # the run's balancing weight, which the export writes (rebuilt blocks had the default 0.01)
            for (_, rebuilt), (_, trained) in zip(moe_blocks(plain), moe_blocks(template)):
                rebuilt.aux_loss_weight = trained.aux_loss_weight
    plain.load_state_dict(sd, assign=True, strict=False)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    live = dict(template.named_buffers())
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (rotary frequencies) are not in the state dict
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner)._buffers[attr] = live[name].detach().cpu().clone()
    left = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"gathered state lacks {left[:3]}")
    return plain


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m deltatune ARGS` with `--nproc` removed.

    --standalone runs a local rendezvous on a free port, so two jobs on one machine don't collide.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}", field="nproc")
    import os

    if "RANK" in os.environ:  # started by torchrun already: each process would start nproc more
        raise ConfigError(
            "--nproc starts torchrun itself; under torchrun drop --nproc (torchrun's --nproc-per-node sets it)",
            field="nproc",
        )
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "deltatune",
        *rest,
    ]


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this command again under torchrun and return its exit status (torchrun ends all ranks if one fails)."""
    import subprocess

    proc = subprocess.Popen(torchrun_command(nproc, argv))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops its workers; wait for it
        return proc.wait()
