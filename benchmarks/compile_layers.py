"""Does compiling whole decoder layers speed up a CPU LoRA step? Eager against torch.compile, same steps.

The lever issue #13 names first: compile each decoder layer (norms, the q/k/v/o and MLP projections with their
LoRA factors, rotary, SiLU times up, residual adds) so inductor fuses the element-wise work between the matmuls.
The per-example span attention stays eager behind a graph break (`torch.compiler.disable`): its loop over
examples would otherwise be unrolled and specialised on every batch's example lengths. The spans travel in an
opaque holder for the same reason (a list of ints would be guarded value by value and recompile every step).
The compiled contender is the training option `compile_layers: true` (`deltatune/train/compiled_layers.py`).

Both contenders run the main benchmark's LoRA steps (SmolLM2-135M, GSM8K, chat template, response-only loss,
rows of 256 tokens, 4 rows a step laid end to end, LoRA r=8 on all linear layers, no dropout, AdamW), in the
training precision of this machine, each in its own process, interleaved `--repeats` times:

- eager: what `deltatune train` runs on CPU (packed attention, the compiled fused RMSNorm);
- compiled: every decoder layer and the final norm through `torch.compile(dynamic=True)` (plain RMSNorm,
  which inductor fuses itself).

Reports the median step time after `--warmup` steps, tokens/s, the first step (compilation included), and the
largest relative difference of the step losses (the two round differently; they must agree closely).

    python benchmarks/compile_layers.py [--steps 10] [--warmup 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record, native_precision  # noqa: E402
from roofline import benchmark_batches  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "compile_layers.json"


def child(variant: str, steps: int, warmup: int, precision: str) -> dict:
    """Train `warmup + steps` LoRA steps one way; step times, losses and real tokens."""
    import torch

    from deltatune.config import TrainConfig
    from deltatune.methods.apply import apply_methods
    from deltatune.models import load_model, load_tokenizer
    from deltatune.train import compiled_layers, fused_norms, packed_attention
    from deltatune.train.loop import method_specs
    from deltatune.train.loss import weighted_lm_loss_sum

    torch.manual_seed(0)
    batches = [batch for _, batch in benchmark_batches(load_tokenizer(None), steps + warmup)]
    cfg = TrainConfig(method="lora", rank=8, alpha=16, dropout=0.0)
    bf16 = precision == "bf16"
    model, _ = load_model(None, dtype=torch.bfloat16 if bf16 else torch.float32)
    adapted = apply_methods(model, method_specs(cfg))
    model = adapted.model
    trainable = [p for _, p in adapted.trainable_parameters()]
    with torch.no_grad():
        for p in trainable:
            p.data = p.data.float()
    model.set_attn_implementation(packed_attention.register(compiled_layers=variant == "compiled"))
    if variant == "eager":
        _, why_not = fused_norms.install(model)
        assert why_not is None, why_not
    else:
        compiled_layers.install(model)  # what `compile_layers: true` does in training
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    times, losses, tokens = [], [], []
    for batch in batches:
        start = time.perf_counter()
        spans = packed_attention.spans_argument(model, batch["position_ids"])
        with autocast:
            hidden = decoder(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], packed_spans=spans, use_cache=False
            ).last_hidden_state
        loss_sum, _ = weighted_lm_loss_sum(hidden, head, batch["input_ids"], batch["loss_weights"])
        loss = loss_sum / batch["loss_weights"][:, 1:].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
        tokens.append(int(batch["n_real_tokens"]))
    return {"times": times, "losses": losses, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup, args.precision)))
        return

    machine = machine_record()
    precision = native_precision(machine)
    print(f"machine: {describe(machine)}; training precision {precision}")
    runs: dict[str, list[dict]] = {"eager": [], "compiled": []}
    for repeat in range(args.repeats):
        for variant in runs:
            cmd = [sys.executable, __file__, "--child", variant, "--precision", precision]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            runs[variant].append(run)
            timed = run["times"][args.warmup :]
            print(f"  repeat {repeat + 1} {variant:8s} median step {statistics.median(timed):.3f} s")
    rows = {}
    for variant, reps in runs.items():
        medians = [statistics.median(r["times"][args.warmup :]) for r in reps]
        tokens = statistics.fmean(sum(r["tokens"][args.warmup :]) / args.steps for r in reps)
        rows[variant] = {
            "step_s": statistics.median(medians),
            "step_s_spread": [min(medians), max(medians)],
            "tokens_per_s": tokens / statistics.median(medians),
            "first_step_s": statistics.median(r["times"][0] for r in reps),
        }
    losses = [(a, b) for a, b in zip(runs["eager"][0]["losses"], runs["compiled"][0]["losses"])]
    rows["max_rel_loss_difference"] = max(abs(a - b) / abs(a) for a, b in losses)
    rows["speedup"] = rows["eager"]["step_s"] / rows["compiled"]["step_s"]
    print(f"\n{'variant':10s}{'step s':>9s}{'spread':>16s}{'tokens/s':>10s}{'first step s':>14s}")
    for variant in runs:
        r = rows[variant]
        spread = f"{r['step_s_spread'][0]:.3f}-{r['step_s_spread'][1]:.3f}"
        print(f"{variant:10s}{r['step_s']:9.3f}{spread:>16s}{r['tokens_per_s']:10.0f}{r['first_step_s']:14.1f}")
    print(
        f"compiled / eager speed: {rows['speedup']:.3f}x; step losses agree within "
        f"{100 * rows['max_rel_loss_difference']:.2f}% (relative)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line(), "machine": machine, "args": vars(args), "results": rows, "runs": runs}
    args.out.write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
