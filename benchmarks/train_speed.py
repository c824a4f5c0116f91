"""Training speed and memory, side by side in one run: deltatune vs TRL+PEFT vs a lean PEFT loop.

Same model (SmolLM2-135M-Instruct), data (GSM8K train, first 512 examples, chat template,
response-only loss), maximum length 256, effective batch, precision (bf16) and LoRA r=8 on all
linear layers with dropout 0. Each contender runs in its own process so that its peak RSS is its
own. Reported: real (non-padding) tokens/s over the timed steps, peak RSS, ratios, and model FLOPs
utilisation against a bf16 matmul peak measured in this run.

    python benchmarks/train_speed.py [--steps 12] [--warmup 2] [--only deltatune,peft-loop,trl,deltatune-full]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
RESULTS_DIR = REPO / "benchmarks" / "results"
N_EXAMPLES, MAX_LEN, BATCH, RANK, ALPHA = 512, 256, 4, 8, 16


def gsm8k_records() -> list[dict]:
    rows = [json.loads(l) for l in GSM8K.read_text().splitlines()[:N_EXAMPLES]]
    return [{"instruction": r["question"], "output": r["answer"]} for r in rows]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflops(dtype_name: str = "bf16", n: int = 2048, reps: int = 10) -> float:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


# --------------------------------------------------------------------------------------------
# contenders (each runs in a child process: `python train_speed.py --child NAME`)
# --------------------------------------------------------------------------------------------
def run_deltatune(
    steps: int,
    warmup: int,
    method: str = "lora",
    options: dict | None = None,
    batch_size: int = BATCH,
    pack_len: int | None = None,
    attention: str = "auto",
) -> dict:
    import tempfile

    from deltatune.config import TrainConfig
    from deltatune.train.loop import train

    records = gsm8k_records()
    out = tempfile.mkdtemp(prefix="bench-dt-")
    lr = 2e-4 if method == "lora" else 2e-5
    cfg = TrainConfig(
        template="chatml",
        policy="response",
        method=method,
        rank=RANK,
        alpha=ALPHA,
        dropout=0.0,
        lr=lr,
        steps=warmup + steps,
        batch_size=batch_size,
        seq_len=MAX_LEN,
        pack_len=pack_len,
        attention=attention,
        precision="bf16",
        output=out,
        eval_fraction=0.0,
        warmup_steps=0,
        log_every=1000,
        method_options=options or {},
    )
    result = train(cfg, quiet=True, records=records)
    timed = [h for h in result.history if h["step"] > warmup]
    # per-step elapsed/tokens come from metrics.jsonl
    metrics = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    t0 = next(m["elapsed_s"] for m in metrics if m["step"] == warmup)
    t1 = metrics[-1]["elapsed_s"]
    tokens = sum(m["tokens"] for m in metrics if m["step"] > warmup)
    trainable = json.loads((Path(out) / "parameters.json").read_text())["trainable"]
    return {"tokens_per_s": tokens / (t1 - t0), "steps": len(timed), "tokens": tokens, "trainable": trainable}


def _chat_rows(tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per example, with the tokenizer's chat template, cut to MAX_LEN."""
    rows = []
    for r in gsm8k_records():
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": r["instruction"]}], tokenize=False, add_generation_prompt=True
        )
        full = prompt + r["output"] + "<|im_end|>\n"
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:MAX_LEN]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append((ids, n_prompt))
    return rows


def peft_config(method: str):
    import peft

    if method == "lora":
        return peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    if method == "dora":
        return peft.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules="all-linear",
            use_dora=True,
            task_type="CAUSAL_LM",
        )
    if method == "ia3":
        return peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        )
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")
    if method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")
    raise ValueError(method)


def run_peft_loop(steps: int, warmup: int, method: str = "lora") -> dict:
    import torch
    from peft import get_peft_model

    from deltatune.models import load_model

    model, tok = load_model(None, dtype=torch.bfloat16)
    model = get_peft_model(model, peft_config(method), autocast_adapter_dtype=False)  # bf16 adapters: fastest here
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, foreach=True)
    rows = _chat_rows(tok)
    tokens, t0 = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        batch = rows[step * BATCH : (step + 1) * BATCH]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((BATCH, width), tok.pad_token_id)
        att = torch.zeros((BATCH, width), dtype=torch.long)
        labels = torch.full((BATCH, width), -100)
        for i, (x, n_prompt) in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            att[i, : len(x)] = 1
            labels[i, n_prompt : len(x)] = torch.tensor(x[n_prompt:])
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += int(att.sum())
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "steps": steps, "tokens": tokens}


def run_trl(steps: int, warmup: int) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from deltatune.models import load_model

    model, tok = load_model(None, dtype=torch.bfloat16)
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["instruction"]}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in gsm8k_records()
        ]
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0, self.tokens, self.step = None, 0, 0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    clock = Clock()
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        max_steps=warmup + steps,
        per_device_train_batch_size=BATCH,
        max_length=MAX_LEN,
        bf16=True,
        learning_rate=2e-4,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        packing=False,
        completion_only_loss=True,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
        callbacks=[clock],
    )
    # real tokens of the timed steps: the trainer's (unshuffled-by-us) batches are random; use the mean
    # real length per example times examples seen, measured on the tokenized dataset.
    lengths = (
        [sum(x) for x in trainer.train_dataset["attention_mask"]]
        if "attention_mask" in trainer.train_dataset.column_names
        else [len(x) for x in trainer.train_dataset["input_ids"]]
    )
    trainer.train()
    mean_len = sum(min(n, MAX_LEN) for n in lengths) / len(lengths)
    tokens = mean_len * BATCH * steps
    return {"tokens_per_s": tokens / (clock.end - clock.t0), "steps": steps, "tokens": round(tokens)}


CONTENDERS = {
    # defaults: 4 rows of up to 256 tokens per step, laid end to end without padding, attention example
    # by example (attention: auto -> packed on CPU)
    "deltatune": lambda s, w: run_deltatune(s, w, "lora"),
    # the same rows padded to 256 tokens each, SDPA with a block-diagonal mask (attention: mask)
    "deltatune-mask": lambda s, w: run_deltatune(s, w, "lora", attention="mask"),
    "peft-loop": run_peft_loop,
    "trl": run_trl,
    "deltatune-full": lambda s, w: run_deltatune(s, w, "full"),
}
# every method (`--only methods`): deltatune's, and PEFT's lean loop where PEFT has the method
METHOD_OPTIONS = {"prompt": {"num_virtual_tokens": 20}, "prefix": {"num_virtual_tokens": 20}}
for _m in ["dora", "mora", "ia3", "qlora", "bitfit", "adapter", "prompt", "prefix", "lora+bitfit"]:
    CONTENDERS[f"deltatune-{_m}"] = (lambda m: lambda s, w: run_deltatune(s, w, m, METHOD_OPTIONS.get(m)))(_m)
for _m in ["dora", "ia3", "prompt", "prefix"]:
    CONTENDERS[f"peft-loop-{_m}"] = (lambda m: lambda s, w: run_peft_loop(s, w, m))(_m)
GROUPS = {
    "main": "deltatune,deltatune-mask,peft-loop,trl,deltatune-full",
    "methods": ",".join(
        ["deltatune"]
        + [
            n
            for n in CONTENDERS
            if n.startswith(("deltatune-", "peft-loop-")) and n not in ("deltatune-full", "deltatune-mask")
        ]
    ),
}


def child(name: str, steps: int, warmup: int) -> None:
    result = CONTENDERS[name](steps, warmup)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", default="main", help="contenders, or a group: main, methods, all")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps, args.warmup)
    import torch

    from deltatune.models import default_model_dir

    default_model_dir()  # convert once, outside the timed children
    peak = matmul_peak_gflops("bf16")
    results = {}
    names = ",".join(CONTENDERS) if args.only == "all" else GROUPS.get(args.only, args.only)
    for name in names.split(","):
        print(f"running {name} ...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"  {name} failed:\n{proc.stderr[-3000:]}")
            continue
        results[name] = json.loads(line[len("RESULT ") :])
    # model FLOPs per real token: LoRA ~ 4N (forward + input gradients; frozen weights get no weight
    # gradient), full finetuning ~ 6N; N = non-embedding parameters + the LM head matmul (tied).
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(default_model_dir())
    per_layer = (
        4 * c.hidden_size * c.hidden_size * (1 + c.num_key_value_heads / c.num_attention_heads) / 2
        + 3 * c.hidden_size * c.intermediate_size
    )
    n = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    base = results.get("trl", {}).get("tokens_per_s")
    lean = results.get("peft-loop", {}).get("tokens_per_s")
    lora = results.get("deltatune", {}).get("tokens_per_s")
    print(f"\nbf16 matmul peak measured now: {peak:.0f} GFLOP/s; N = {n / 1e6:.1f}M matmul parameters")
    print(
        f"{'contender':22s}{'tokens/s':>10s}{'peak RSS MiB':>14s}{'x TRL':>8s}{'x lean':>8s}{'x LoRA':>8s}{'MFU':>7s}"
    )
    for name, r in results.items():
        flops = (6 if name.endswith("full") else 4) * n * r["tokens_per_s"]  # adapters' own FLOPs ignored
        r["mfu"] = flops / (peak * 1e9)
        r["x_trl"] = r["tokens_per_s"] / base if base else None
        r["x_peft_loop"] = r["tokens_per_s"] / lean if lean else None
        r["x_deltatune_lora"] = r["tokens_per_s"] / lora if lora else None
        fx = lambda v: f"{v:8.2f}" if v else f"{'-':>8s}"
        print(
            f"{name:22s}{r['tokens_per_s']:10.0f}{r['peak_rss_mib']:14.0f}{fx(r['x_trl'])}{fx(r['x_peft_loop'])}"
            f"{fx(r['x_deltatune_lora'])}"
            f"{100 * r['mfu']:6.1f}%"
        )
    RESULTS = RESULTS_DIR / f"train_speed_{args.only if args.only in GROUPS or args.only == 'all' else 'custom'}.json"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "matmul_peak_gflops_bf16": peak,
                "matmul_params": n,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "steps": args.steps,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
