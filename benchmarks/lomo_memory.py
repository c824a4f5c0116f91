"""Peak memory of plain full finetuning vs the LOMO-style fused update, side by side in one run.

Each (model, optimizer, mode) runs in its own process. A sampler thread records the process RSS every
2 ms during the training steps (CPU), or torch.cuda.max_memory_allocated is read (CUDA). Reported: RSS
before the first step (weights loaded), peak during training, their difference (the training
overhead: gradients, optimizer state, activations), the largest set of gradients alive at once
(observed in gradient hooks), and the ratio fused/plain of the training overhead.

Models: "small" (a random 8-layer Llama, hidden 512, 29M parameters), "default" (SmolLM2-135M-Instruct)
and "smollm2-shape" (SmolLM2-135M's shapes with random weights, for machines without the model file);
all fp32. Data: random token ids, batch 2 x 128 (memory does not depend on them).

    python benchmarks/lomo_memory.py [--models small,default] [--steps 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "lomo_memory.json"
MIB = 1024 * 1024


def load(name: str, device: str):
    import torch

    if name == "small":
        from transformers import LlamaForCausalLM

        from deltatune.testing import tiny_llama_config

        torch.manual_seed(0)
        cfg = tiny_llama_config(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=4)
        model = LlamaForCausalLM(cfg)
    elif name == "smollm2-shape":  # the default model's exact shapes, random weights (no file needed: GPU runs)
        from transformers import LlamaForCausalLM

        from deltatune.testing import tiny_llama_config

        torch.manual_seed(0)
        cfg = tiny_llama_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64)
        model = LlamaForCausalLM(cfg)
    else:
        from deltatune.models import load_model

        model, _ = load_model(None, dtype=torch.float32)
    return model.to(device).train()


class RssSampler:
    def __init__(self) -> None:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def child(model_name: str, algorithm: str, mode: str, steps: int, device: str) -> dict:
    import psutil
    import torch

    from deltatune.train.lomo import FusedUpdate

    torch.set_num_threads(2)
    model = load(model_name, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    ids = torch.randint(3, model.config.vocab_size, (2, 128), device=device)
    if mode == "fused":
        opt = FusedUpdate(params, lr=1e-5, algorithm=algorithm)
    elif algorithm == "sgd":
        opt = torch.optim.SGD(params, lr=1e-5)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)  # foreach would add temporaries; be fair to plain

    live = [0]

    def observe(_):
        live[0] = max(live[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    handles = [p.register_post_accumulate_grad_hook(observe) for p in params]
    before = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.synchronize()
        before_cuda = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with RssSampler() as sampler:
        for _ in range(steps):
            loss = model(ids, labels=ids).loss
            if mode == "fused":
                with opt.step_hooks_enabled():
                    loss.backward()
                opt.step()
            else:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            del loss
    seconds = (time.perf_counter() - t0) / steps
    for h in handles:
        h.remove()
    out = {"model": model_name, "algorithm": algorithm, "mode": mode, "device": device, "params": n_params,
           "weights_mib": round(sum(p.nbytes for p in params) / MIB, 1),
           "rss_before_mib": round(before / MIB, 1), "rss_peak_mib": round(sampler.peak / MIB, 1),
           "rss_overhead_mib": round((sampler.peak - before) / MIB, 1),
           "max_live_grad_mib": round(live[0] / MIB, 2), "seconds_per_step": round(seconds, 3)}
    if device == "cuda":
        out["cuda_before_mib"] = round(before_cuda / MIB, 1)
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
        out["cuda_overhead_mib"] = round((torch.cuda.max_memory_allocated() - before_cuda) / MIB, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,default")
    ap.add_argument("--algorithms", default="sgd,adamw")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "ALGORITHM", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.device)))
        return
    rows = []
    for model in args.models.split(","):
        for algorithm in args.algorithms.split(","):
            for mode in ("plain", "fused"):
                cmd = [sys.executable, __file__, "--child", model, algorithm, mode, "--steps", str(args.steps),
                       "--device", args.device]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{model}/{algorithm}/{mode} failed")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"ran {model}/{algorithm}/{mode}", file=sys.stderr, flush=True)
    key = "cuda_overhead_mib" if args.device == "cuda" else "rss_overhead_mib"
    for r in rows:
        plain = next(x for x in rows if x["model"] == r["model"] and x["algorithm"] == r["algorithm"]
                     and x["mode"] == "plain")
        r["overhead_ratio_vs_plain"] = round(r[key] / plain[key], 3) if plain[key] else None
        r["saved_mib"] = round(plain[key] - r[key], 1)
    cols = ["model", "algorithm", "mode", "params", "weights_mib", "rss_before_mib", "rss_peak_mib",
            "rss_overhead_mib", "max_live_grad_mib", "overhead_ratio_vs_plain", "saved_mib", "seconds_per_step"]
    if args.device == "cuda":
        cols[5:8] = ["cuda_before_mib", "cuda_peak_mib", "cuda_overhead_mib"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    out = RESULTS if args.device == "cpu" else RESULTS.with_name("lomo_memory_cuda.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"steps": args.steps, "batch": [2, 128], "dtype": "fp32", "rows": rows}, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
