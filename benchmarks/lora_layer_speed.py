"""LoRA step time: deltatune's LoRALinear vs PEFT's LoRA layer, same model, weights and data, one run.

Random-weight SmolLM2-135M-shaped Llama (config only, nothing downloaded), LoRA r=8 alpha=16 on all
linear layers, dropout 0 (and 0.05), bf16 weights and adapters, batch 4 x 256, forward + backward +
AdamW step, interleaved repetitions; the median is reported (the minimum too, in the JSON). With dropout, a
third contender is deltatune's layer with torch's `nn.Dropout` swapped back in, which isolates what deltatune's
CPU dropout (deltatune/methods/dropout.py) buys.
Writes benchmarks/results/lora_layer_speed.json with the machine record.

    python benchmarks/lora_layer_speed.py [--steps 4] [--batch 4] [--seq 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, machine_record  # noqa: E402


def build(kind: str, dropout: float, dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    from deltatune.analysis.memory import BUILTIN_CONFIGS

    values = dict(BUILTIN_CONFIGS["smollm2-135m"])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if kind == "peft":
        import peft

        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        from deltatune.methods.apply import apply_methods
        from deltatune.methods.base import MethodSpec

        adapted = apply_methods(model, [MethodSpec(name="lora", rank=8, alpha=16, dropout=dropout, targets=targets)])
        params = [p for _, p in adapted.trainable_parameters()]
        if kind == "deltatune+nn.Dropout":  # the same layer with torch's dropout: isolates the dropout kernel
            for module in model.modules():
                if getattr(module, "lora_dropout", None) is not None:
                    module.lora_dropout = torch.nn.Dropout(dropout)
    model.train()
    return model, torch.optim.AdamW(params, lr=1e-4)


def step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    machine = machine_record()
    print(f"machine: {describe(machine)}")
    dtype, device = torch.bfloat16, torch.device(args.device)
    ids = torch.randint(3, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for dropout in (0.0, 0.05):
        kinds = ("deltatune", "peft") + (("deltatune+nn.Dropout",) if dropout else ())
        runs = {k: build(k, dropout, dtype, device) for k in kinds}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for k, (m, o) in runs.items():  # warm-up
            step(m, o, ids)
        for _ in range(args.steps):
            for k, (m, o) in runs.items():  # interleaved, so load from others hits both alike
                sync()
                t = time.perf_counter()
                step(m, o, ids)
                sync()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        tokens = args.batch * args.seq
        rows.append(
            {
                "dropout": dropout,
                "deltatune_s": med["deltatune"],
                "peft_s": med["peft"],
                "deltatune_tok_s": tokens / med["deltatune"],
                "peft_tok_s": tokens / med["peft"],
                "speedup": med["peft"] / med["deltatune"],
                "min_s": best,
                **(
                    {
                        "deltatune_nn_dropout_s": med["deltatune+nn.Dropout"],
                        "dropout_kernel_speedup": med["deltatune+nn.Dropout"] / med["deltatune"],
                    }
                    if dropout
                    else {}
                ),
            }
        )
        del runs
    print(
        f"{'dropout':>8} {'deltatune s/step':>17} {'peft s/step':>12} {'deltatune tok/s':>16} {'peft tok/s':>11} "
        f"{'x peft':>7} {'with nn.Dropout s/step':>23} {'x nn.Dropout':>13}"
    )
    for r in rows:
        extra = (
            f"{r['deltatune_nn_dropout_s']:>23.3f} {r['dropout_kernel_speedup']:>13.2f}"
            if "deltatune_nn_dropout_s" in r
            else f"{'-':>23} {'-':>13}"
        )
        print(
            f"{r['dropout']:>8} {r['deltatune_s']:>17.3f} {r['peft_s']:>12.3f} {r['deltatune_tok_s']:>16.0f} "
            f"{r['peft_tok_s']:>11.0f} {r['speedup']:>7.2f} {extra}"
        )
    out = Path(__file__).parent / "results" / "lora_layer_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "seq": args.seq,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
