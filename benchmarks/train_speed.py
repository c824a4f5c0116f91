"""Training speed and memory, side by side and fair: deltatune vs TRL's SFTTrainer vs a lean PEFT loop.

Every contender trains the same examples in the same order, with the same hyper-parameters:
- data: GSM8K train under the chat template, response-only loss, examples of 129-256 tokens (so
  that deltatune's best-fit packing puts exactly one example in each 256-token row), 4 a step, in
  the order deltatune's loader draws them (`random.Random(seed).shuffle`), handed to the others
  already tokenized (TRL gets `input_ids` and `completion_mask`, and a sequential sampler);
- LoRA r=8, alpha 16, dropout 0 on all linear layers (or full finetuning), AdamW, constant lr, no
  weight decay, gradient clipping at 1.0;
- precision: `auto` picks bf16 where the CPU multiplies bf16 natively (AVX-512 bf16, AMX) and fp32
  elsewhere (AVX2-only CPUs emulate bf16 matmuls at a fraction of a GFLOP/s), for every contender.
Contenders: deltatune (packed rows, attention span by span), deltatune with `attention: mask`, the
lean PEFT loop (padded batch, SDPA, with deltatune's response-only LM head), TRL with its defaults
(activation checkpointing on), TRL with `gradient_checkpointing=False` (its fastest setting here),
TRL padding-free, full finetuning by deltatune and by the lean loop, and deltatune's LoRA and full finetuning
with compiled decoder layers (what `compile_layers: auto` gives runs of 500k tokens or more).

The loss is checked, not assumed: each contender's per-step losses are compared with deltatune's
(step 1, where every LoRA starts from the base model, and the mean of the last 3 steps, where
LoRA's random A matrices differ between libraries). Each contender runs `--repeats` times,
interleaved (1, 2, ..., 1, 2, ...), each in its own process so that its peak RSS is its own; the
table gives the median and the spread (max - min, % of the median). The JSON records the machine
(CPU model and flags, matmul peak in the precision used) and the fast paths deltatune took.

    python benchmarks/train_speed.py [--steps 12] [--warmup 2] [--repeats 3] [--precision auto]
                                     [--only main|methods|gpu|all|NAME,...] [--quick]
                                     [--device cpu|cuda] [--batch 4] [--data GSM8K_TRAIN_JSONL]

On a GPU (`--device cuda`, bf16) every contender runs there (TRL without `use_cpu`, the lean loop's tensors moved),
the peak is an 8192^3 bf16 product on the GPU, the memory column is torch's peak allocated GPU memory, and the
`gpu` group adds `deltatune-packed`: deltatune's packed rows with PyTorch's variable-length flash attention
(`attention: auto` keeps SDPA with the block-diagonal mask on CUDA). Use a batch that fills the GPU (`--batch 32`);
`benchmarks/gpu_speed.sh` runs it on a lent machine with random weights in SmolLM2-135M's shapes.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, gpu_info, machine_record, matmul_peak_gflops  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
RESULTS_DIR = REPO / "benchmarks" / "results"
POOL, MAX_LEN, BATCH, RANK, ALPHA, SEED = 2048, 256, 4, 8, 16, 0
LR = {"lora": 2e-4, "full": 2e-5}
# the loss check: step 1 (the same weights on the same batch: only numerics differ, more in bf16) and the
# mean of the last 3 steps (LoRA's random A matrices differ between libraries)
TOL_FIRST, TOL_LAST = {"fp32": 0.001, "bf16": 0.01}, 0.05


# --------------------------------------------------------------------------------------------
# the shared data: the same examples, in deltatune's order, for every contender
# --------------------------------------------------------------------------------------------
def benchmark_data(
    tokenizer, n_examples: int, batch: int = BATCH, data: Path | str | None = None
) -> tuple[list[dict], list, list[list[int]]]:
    """(records, tokenized examples with response weights, batches of example indices in training order)."""
    from deltatune.data.masking import LossPolicy, policy_weights
    from deltatune.data.pipeline import prepare_records

    rows = [json.loads(line) for line in Path(data or GSM8K).read_text().splitlines()[:POOL]]
    records = [{"instruction": r["question"], "output": r["answer"]} for r in rows]
    prepared = prepare_records(records, tokenizer, template="chatml", max_len=MAX_LEN).examples
    # whole examples (none cut to MAX_LEN) of more than half a row; `source` is "<records>:LINE" (1-based), since
    # preparation may drop records (a response cut away entirely) and indices would no longer line up
    keep = [ex for ex in prepared if MAX_LEN // 2 < len(ex) and not ex.truncated][:n_examples]
    if len(keep) < n_examples:
        raise SystemExit(f"only {len(keep)} whole GSM8K examples of {MAX_LEN // 2 + 1}-{MAX_LEN} tokens; fewer steps")
    records, examples = [records[int(ex.source.rsplit(":", 1)[1]) - 1] for ex in keep], keep
    for ex in examples:
        ex.weights = policy_weights(ex, LossPolicy("response"))
    order = list(range(n_examples))
    random.Random(SEED).shuffle(order)  # deltatune's first epoch: pack_examples(shuffle_seed=seed + 0)
    return records, examples, [order[i : i + batch] for i in range(0, n_examples, batch)]


def check_same_order(
    tokenizer, records: list[dict], examples: list, batches: list[list[int]], batch: int = BATCH
) -> None:
    """deltatune's loader, given `records`, must yield exactly `batches` (one example a row): checked, not assumed."""
    from deltatune.config import TrainConfig
    from deltatune.data.pipeline import prepare_records
    from deltatune.train.checkpoint import Position
    from deltatune.train.loop import MicroBatches

    cfg = TrainConfig(seq_len=MAX_LEN, batch_size=batch, seed=SEED, eval_fraction=0.0)
    loader = MicroBatches(list(prepare_records(records, tokenizer, template="chatml", max_len=MAX_LEN).examples), cfg)
    pos = Position()
    got = [[ex.input_ids for ex in row] for _ in batches for row in loader.take(pos, 1)[0]]
    want = [[examples[i].input_ids] for batch in batches for i in batch]
    if got != want:
        raise SystemExit("deltatune's loader would train other examples, or in another order, than the others")


def examples_of(ctx: dict, tokenizer) -> tuple[list[dict], list, list[list[int]]]:
    """benchmark_data for a child: the run's examples, batch size and data file."""
    return benchmark_data(tokenizer, ctx["examples"], ctx.get("batch", BATCH), ctx.get("data"))


def on_cuda(ctx: dict) -> bool:
    return ctx.get("device", "cpu").startswith("cuda")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torch_dtype(precision: str):
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def resolve_precision(choice: str) -> str:
    from deltatune.train.loop import _cpu_has_bf16

    return choice if choice != "auto" else ("bf16" if _cpu_has_bf16() else "fp32")


# --------------------------------------------------------------------------------------------
# contenders (each runs in a child process: `python train_speed.py --child NAME`)
# --------------------------------------------------------------------------------------------
def deltatune_config(model: str, method: str, steps: int, output: str, **overrides):
    """The main benchmark's deltatune run: chat template, response-only loss, LoRA r=8 alpha 16 without dropout
    (or full finetuning) at a constant learning rate, 4 rows of 256 tokens a step, nothing held out, the
    benchmark's seed; `overrides` (any TrainConfig key) on top. profile_step.py and step_products.py run it too."""
    from deltatune.config import TrainConfig

    settings = dict(
        model=model,
        template="chatml",
        policy="response",
        method=method,
        **({} if method == "full" else dict(rank=RANK, alpha=ALPHA, dropout=0.0)),  # full reads none of them
        lr=LR["full" if method == "full" else "lora"],
        schedule="constant",
        warmup_steps=0,
        steps=steps,
        batch_size=BATCH,
        seq_len=MAX_LEN,
        precision="auto",
        output=output,
        eval_fraction=0.0,
        log_every=1000,
        seed=SEED,
    )
    return TrainConfig(**{**settings, **overrides})


def run_deltatune(
    ctx: dict, method: str = "lora", attention: str = "auto", compile_layers: bool | str = "auto"
) -> dict:
    """deltatune's own training loop; compile_layers auto leaves these short runs eager (`true`: what runs of
    500k tokens or more get by default; its compilation falls in the untimed warm-up steps)."""
    import torch

    from deltatune.models import load_tokenizer
    from deltatune.train import compiled_layers, fused_norms, packed_attention
    from deltatune.train.loop import train, use_packed_attention

    if "keep_probabilities" in ctx:  # benchmarks/kept_probabilities.py's two variants
        packed_attention.KEEP_PROBABILITIES = ctx["keep_probabilities"]
    if ctx.get("fp32_head"):  # benchmarks/head_precision.py: the head as it ran before 2026-12-07
        from deltatune.train import loop

        bf16_head = loop.weighted_lm_loss_sum
        loop.weighted_lm_loss_sum = lambda *a, compute_dtype=None, **k: bf16_head(*a, **k)
    records, _, _ = examples_of(ctx, load_tokenizer(ctx["model"]))
    out = tempfile.mkdtemp(prefix="bench-dt-")
    cfg = deltatune_config(
        ctx["model"],
        method,
        ctx["warmup"] + ctx["steps"],
        out,
        batch_size=ctx.get("batch", BATCH),
        attention=attention,
        device=ctx.get("device", "cpu"),
        compile_layers=compile_layers,
        precision=ctx["precision"],
        keep_freed_memory=ctx.get("keep_freed_memory", "auto"),
    )
    paths: dict = {}
    clock: dict[int, float] = {}  # the end of the last warm-up step and of the last step, unrounded

    def note_fast_paths(step: int, total: int, model) -> None:
        if step in (ctx["warmup"], total):  # after the optimizer step; on a GPU once its queue has drained
            if on_cuda(ctx):
                torch.cuda.synchronize()
            clock[step] = time.perf_counter()
        if step == 1:  # the hook sees the training model (its norms swapped in, if fused)
            device = torch.device(ctx.get("device", "cpu"))
            paths["packed_attention"] = use_packed_attention(cfg, model, device)
            if device.type == "cuda":  # the spans to PyTorch's variable-length flash attention, one kernel a layer
                head_dim = model.config.hidden_size // model.config.num_attention_heads
                probe = torch.empty(1, head_dim, device=device, dtype=torch_dtype(ctx["precision"]))
                paths["varlen_attention"] = paths["packed_attention"] and packed_attention.varlen_usable(probe)
            paths["fused_norms"] = any(isinstance(m, fused_norms.FusedRMSNorm) for m in model.modules())
            # compile_layers: auto compiles runs of 500k tokens or more; these timed runs are far shorter
            paths["compiled_layers"] = all(
                getattr(m, "_compiled_call_impl", None) is not None for m in compiled_layers.compile_targets(model)
            )

    train(cfg, quiet=True, records=records, on_step=note_fast_paths)
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {
        "seconds": clock[max(clock)] - clock[ctx["warmup"]],
        "losses": [m["loss"] for m in metrics],
        "trainable": json.loads((Path(out) / "parameters.json").read_text())["trainable"],
        "fast_paths": paths,
    }


def run_lean_loop(ctx: dict, method: str = "lora") -> dict:
    """PEFT (or plain full finetuning) in a plain loop: padded batch, SDPA, the LM head on loss positions only."""
    import torch
    import torch.nn.functional as F

    from deltatune.models import load_model

    dtype, device = torch_dtype(ctx["precision"]), torch.device(ctx.get("device", "cpu"))
    model, tok = load_model(ctx["model"], dtype=dtype if method != "full" else torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
        for p in model.parameters():  # fp32 master weights for what trains, as deltatune keeps them
            if p.requires_grad:
                p.data = p.data.float()
    model.to(device).train()
    decoder, head = model.get_base_model().model if method == "lora" else model.model, model.get_output_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused, as TRL's (Trainer's default `adamw_torch_fused` since torch 2.8) and deltatune's: the anchor's optimizer
    # is not what the comparison is about (benchmarks/optimizer_step.py: foreach is ~7x slower on CPU)
    opt = torch.optim.AdamW(params, lr=LR[method], weight_decay=0.0, fused=True)
    _, examples, batches = examples_of(ctx, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx["precision"] == "bf16")
    losses, t0 = [], None
    for step, batch in enumerate(batches[: ctx["warmup"] + ctx["steps"]]):
        if step == ctx["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()  # the last warm-up step's optimizer update done
            t0 = time.perf_counter()
        rows = [examples[i] for i in batch]
        width = max(len(ex) for ex in rows)
        ids = torch.full((len(rows), width), pad)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, ex in enumerate(rows):
            ids[r, : len(ex)] = torch.tensor(ex.input_ids)
            att[r, : len(ex)] = 1
            target[r, : len(ex)] = torch.tensor([w > 0 for w in ex.weights])
        ids, att, target = ids.to(device), att.to(device), target.to(device)
        with autocast:
            hidden = decoder(input_ids=ids, attention_mask=att).last_hidden_state
            where = target[:, 1:]  # hidden state t predicts token t + 1
            logits = head(hidden[:, :-1][where])
        loss = F.cross_entropy(logits.float(), ids[:, 1:][where])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "losses": losses, "trainable": sum(p.numel() for p in params)}


def run_trl(ctx: dict, gradient_checkpointing: bool | None = None, padding_free: bool = False) -> dict:
    """TRL's SFTTrainer with PEFT LoRA; `gradient_checkpointing=None` keeps TRL's default (on)."""
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from deltatune.models import load_model

    model, tok = load_model(ctx["model"], dtype=torch_dtype(ctx["precision"]))
    _, examples, batches = examples_of(ctx, tok)
    in_order = [examples[i] for batch in batches for i in batch]
    data = Dataset.from_list(
        [{"input_ids": ex.input_ids, "completion_mask": [int(w > 0) for w in ex.weights]} for ex in in_order]
    )

    class InOrder(SFTTrainer):  # the examples in deltatune's order, not the trainer's shuffle
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = self.end = None
            self.losses: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == ctx["warmup"]:
                if on_cuda(ctx):
                    import torch

                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if on_cuda(ctx):
                import torch

                torch.cuda.synchronize()
            self.end = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    options = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        max_steps=ctx["warmup"] + ctx["steps"],
        per_device_train_batch_size=ctx.get("batch", BATCH),
        max_length=None if padding_free else MAX_LEN,  # padding-free wants no limit; the inputs fit already
        bf16=ctx["precision"] == "bf16",
        learning_rate=LR["lora"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        packing=False,
        padding_free=padding_free,
        completion_only_loss=True,
        dataloader_num_workers=0,
        use_cpu=not on_cuda(ctx),
        seed=SEED,
        **options,
    )
    clock = Clock()
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"),
        callbacks=[clock],
    )
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "seconds": clock.end - clock.t0,
        "losses": clock.losses,
        "trainable": trainable,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
    }


CONTENDERS = {
    # 4 rows of one example each, end to end without padding, attention span by span (auto on CPU)
    "deltatune": lambda c: run_deltatune(c, "lora"),
    # the same rows padded to 256 tokens each, SDPA with a block-diagonal mask
    "deltatune-mask": lambda c: run_deltatune(c, "lora", attention="mask"),
    # attention span by span whatever the device: on CUDA (where auto keeps the mask) varlen flash attention
    "deltatune-packed": lambda c: run_deltatune(c, "lora", attention="packed"),
    "peft-loop": lambda c: run_lean_loop(c, "lora"),
    "trl": lambda c: run_trl(c),  # TRL's defaults: activation checkpointing on
    "trl-nogc": lambda c: run_trl(c, gradient_checkpointing=False),
    "trl-padfree": lambda c: run_trl(c, gradient_checkpointing=False, padding_free=True),
    "deltatune-full": lambda c: run_deltatune(c, "full"),
    "peft-loop-full": lambda c: run_lean_loop(c, "full"),
    # the decoder layers compiled, as `compile_layers: auto` does for runs of 500k tokens or more
    "deltatune-compiled": lambda c: run_deltatune(c, "lora", compile_layers=True),
    "deltatune-compiled-full": lambda c: run_deltatune(c, "full", compile_layers=True),
}
METHODS = ["dora", "mora", "ia3", "qlora", "bitfit", "adapter", "lora+bitfit"]
for _m in METHODS:
    CONTENDERS[f"deltatune-{_m}"] = (lambda m: lambda c: run_deltatune(c, m))(_m)
GROUPS = {
    "main": "deltatune,deltatune-mask,peft-loop,trl,trl-nogc,trl-padfree,deltatune-full,peft-loop-full,"
    "deltatune-compiled,deltatune-compiled-full",
    "methods": ",".join(["deltatune"] + [f"deltatune-{m}" for m in METHODS]),
    # on a GPU (`--device cuda`): deltatune's auto (the mask path there) against its packed path (varlen flash)
    "gpu": "deltatune,deltatune-packed,peft-loop,trl,trl-nogc,trl-padfree,deltatune-full,peft-loop-full",
}
# whose losses each contender is checked against (the others: deltatune's)
REFERENCE = {"peft-loop-full": "deltatune-full", "deltatune-compiled-full": "deltatune-full"}


def child(name: str, ctx: dict) -> None:
    import torch

    torch.manual_seed(SEED)
    result = CONTENDERS[name](ctx)
    result["peak_rss_mib"] = peak_rss_mib()
    if on_cuda(ctx):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# the parent: interleaved repeats, the loss check, the table
# --------------------------------------------------------------------------------------------
def loss_check(losses: list[float], ref: list[float], tol_first: float) -> dict:
    if not losses or not ref or len(losses) != len(ref):
        return {"ok": False, "why": f"{len(losses)} losses against {len(ref)}"}
    first = abs(losses[0] - ref[0]) / abs(ref[0])
    last = abs(statistics.mean(losses[-3:]) - statistics.mean(ref[-3:])) / abs(statistics.mean(ref[-3:]))
    return {"first_step_rel": first, "last3_rel": last, "ok": first <= tol_first and last <= TOL_LAST}


def summarise(runs: list[dict]) -> dict:
    rates = [r["tokens_per_s"] for r in runs]
    med = statistics.median(rates)
    return {
        "tokens_per_s": med,
        "spread_pct": 100 * (max(rates) - min(rates)) / med,
        "all_tokens_per_s": rates,
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        **({"peak_gpu_mib": statistics.median(r["peak_gpu_mib"] for r in runs)} if "peak_gpu_mib" in runs[0] else {}),
        "losses": runs[0]["losses"],
        **{k: v for k, v in runs[0].items() if k in ("trainable", "fast_paths", "gradient_checkpointing")},
    }


def matmul_parameters(model: str) -> float:
    """N = non-embedding matmul parameters + the LM head's (tied): ~2N FLOPs per token forward."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    kv = c.num_key_value_heads / c.num_attention_heads
    per_layer = 2 * c.hidden_size * c.hidden_size * (1 + kv) + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender, interleaved (default 3)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--only", default="main", help="contenders, or a group: main, methods, all")
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: every contender on that device")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"examples a step (default {BATCH})")
    parser.add_argument("--data", type=Path, default=None, help="GSM8K's train.jsonl (default: ../shared/data)")
    parser.add_argument("--out", type=Path, help="results file (default: results/train_speed_<group>.json)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, 3 steps, 1 repeat: checks the code")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ctx", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, json.loads(args.ctx))
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the clock starts at the end of the warm-up)")
    from deltatune.models import default_model_dir

    if args.quick:
        from deltatune.experiments.common import quick_model

        args.model = quick_model(Path(tempfile.mkdtemp(prefix="bench-quick-")) / "model")
        args.steps, args.warmup, args.repeats = 3, 1, 1
    model = args.model or str(default_model_dir())  # convert once, outside the timed children
    cuda = args.device.startswith("cuda")
    precision = (
        resolve_precision(args.precision) if not cuda else ("bf16" if args.precision == "auto" else args.precision)
    )
    ctx = {
        "model": model,
        "precision": precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "examples": (args.steps + args.warmup) * args.batch,
        "batch": args.batch,
        "data": str((args.data or GSM8K).resolve()),  # the children run in the repository's root
        "device": args.device,
    }
    from deltatune.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    records, examples, batches = benchmark_data(tokenizer, ctx["examples"], args.batch, args.data)
    check_same_order(tokenizer, records, examples, batches, args.batch)
    tokens = sum(len(examples[i]) for batch in batches[args.warmup :] for i in batch)  # the timed steps'
    names = ",".join(CONTENDERS) if args.only == "all" else GROUPS.get(args.only, args.only)
    names = names.split(",")
    machine = machine_record(measure_peak=False)
    if cuda:
        machine.update(gpu_info(args.device))
    machine["matmul_peak_precision"] = precision
    machine["matmul_peak_gflops"] = matmul_peak_gflops(precision, device=args.device)
    peak = machine["matmul_peak_gflops"]
    print(f"machine: {describe(machine)}")
    print(f"{len(names)} contenders x {args.repeats} repeats, {args.steps} timed steps ({tokens} tokens) each")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    failed: dict[str, str] = {}
    for rep in range(args.repeats):
        for name in names:
            if name in failed:
                continue
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, "--ctx", json.dumps(ctx)],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                failed[name] = (
                    proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                )
                print(f"  [{rep + 1}/{args.repeats}] {name} failed: {failed[name]}", flush=True)
                continue
            r = json.loads(line[len("RESULT ") :])
            r["tokens_per_s"] = tokens / r["seconds"]
            runs[name].append(r)
            print(
                f"  [{rep + 1}/{args.repeats}] {name}: {r['tokens_per_s']:.0f} tokens/s "
                f"({time.perf_counter() - t:.0f} s with start-up)",
                flush=True,
            )
    results = {n: summarise(rs) for n, rs in runs.items() if rs}
    n = matmul_parameters(model)
    by = lambda key: results.get(key, {}).get("tokens_per_s")  # noqa: E731
    for name, r in results.items():
        ref = REFERENCE.get(name, "deltatune-full" if name == "deltatune-full" else "deltatune")
        r["loss_check"] = (
            loss_check(r["losses"], results[ref]["losses"], TOL_FIRST[precision]) if ref in results else None
        )
        full = name.endswith("full")
        r["mfu"] = (6 if full else 4) * n * r["tokens_per_s"] / (peak * 1e9)  # adapters' own FLOPs ignored
        r["x_trl"] = r["tokens_per_s"] / by("trl") if by("trl") else None
        r["x_trl_nogc"] = r["tokens_per_s"] / by("trl-nogc") if by("trl-nogc") else None
        lean = by("peft-loop-full" if full else "peft-loop")
        r["x_lean"] = r["tokens_per_s"] / lean if lean else None
    fx = lambda v: f"{v:7.2f}" if v else f"{'-':>7s}"  # noqa: E731
    print(f"\n{describe(machine)}; precision {precision}; {args.steps} timed steps x {args.repeats} repeats")
    memory = "peak_gpu_mib" if cuda else "peak_rss_mib"  # on a GPU, its memory (torch's peak allocated)
    print(
        f"{'contender':24s}{'tokens/s':>9s}{'spread':>8s}{'GPU MiB' if cuda else 'RSS MiB':>9s}{'x TRL':>7s}"
        f"{'x nogc':>7s}{'x lean':>7s}{'MFU':>7s}  loss check (step 1, last 3)"
    )
    for name, r in results.items():
        c = r["loss_check"]
        check = (
            "-"
            if not c
            else c.get("why") or (f"{'ok' if c['ok'] else 'DIFFERS'} ({c['first_step_rel']:.1%}, {c['last3_rel']:.1%})")
        )
        print(
            f"{name:24s}{r['tokens_per_s']:9.0f}{r['spread_pct']:7.0f}%{r[memory]:9.0f}{fx(r['x_trl'])}"
            f"{fx(r['x_trl_nogc'])}{fx(r['x_lean'])}{100 * r['mfu']:6.1f}%  {check}"
        )
    for name, why in failed.items():
        print(f"{name:24s} did not run: {why}")
    paths = results.get("deltatune", {}).get("fast_paths")
    if paths:
        print(f"deltatune's fast paths: {', '.join(k for k, v in paths.items() if v) or 'none'}")
    tag = args.only if args.only in GROUPS or args.only == "all" else "custom"
    out = args.out or RESULTS_DIR / f"train_speed_{tag}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command_line(),
        "machine": machine,
        "precision": precision,
        "device": args.device,
        "batch": args.batch,
        "matmul_params": n,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "timed_tokens": tokens,
        "tolerance": {"first_step_rel": TOL_FIRST[precision], "last3_rel": TOL_LAST},
        "results": results,
        "failed": failed,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
