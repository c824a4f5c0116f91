"""What a benchmark ran on: CPU model and the flags that decide bf16 speed, torch's threads, and the
bf16 matmul peak measured now. Every result JSON records this, since sessions land on different
CPU kinds (AMD EPYC with AVX-512 bf16, Intel Xeon with AMX) and the ratios differ between them.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

FLAGS_OF_INTEREST = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")


def seconds_per_call(fn, iters: int) -> float:
    """Mean wall-clock seconds of `fn()` over `iters` back-to-back calls (CPU work: no device sync)."""
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def command_line() -> str:
    """The command that made a result, as a user would type it (recorded in every result JSON)."""
    return "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "cpu_kind": "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "other",
    }


def matmul_peak_gflops(dtype_name: str = "bf16", n: int = 2048, reps: int = 10, device: str = "cpu") -> float:
    """Square-matmul throughput: an upper bound, not the step's attainable limit (see roofline.py). On CUDA
    8192^3 products (2048^3 is launch-bound there), timed after a synchronize."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    cuda = device.startswith("cuda")
    n = 8192 if cuda and n == 2048 else n
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    flops = 2 * n**3 * reps / (time.perf_counter() - t)
    if cuda:
        del a, b
        torch.cuda.empty_cache()  # the parent holds no GPU memory while the contenders run
    return flops / 1e9


def gpu_info(device: str = "cuda") -> dict:
    """The CUDA device a GPU benchmark ran on (name, compute capability, memory), for its results file."""
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return {
        "gpu": props.name,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
    }


def machine_record(measure_peak: bool = True) -> dict:
    import torch

    record = {
        **cpu_info(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        import transformers

        record["transformers"] = transformers.__version__
    except ImportError:
        pass
    if measure_peak:  # in the precision training picks here: an emulated bf16 peak would take many minutes
        record["matmul_peak_precision"] = native_precision(record)
        record["matmul_peak_gflops"] = round(matmul_peak_gflops(record["matmul_peak_precision"]), 1)
    return record


def native_precision(record: dict | None = None) -> str:
    """bf16 where the CPU multiplies it natively (AVX-512 bf16, AMX), else fp32 (as `precision: auto`)."""
    return "bf16" if (record or cpu_info())["cpu_kind"] in ("amx", "avx512_bf16") else "fp32"


def describe(record: dict) -> str:
    flags = ",".join(record.get("cpu_flags", [])) or "-"
    peak, precision = record.get("matmul_peak_gflops"), record.get("matmul_peak_precision")
    gpu = f"{record['gpu']} (CUDA {record.get('cuda')}) on " if record.get("gpu") else ""
    return (
        gpu
        + f"{record.get('cpu_model')} [{flags}], {record.get('threads')} threads, torch {record.get('torch')}"
        + (f", {precision} matmul peak {peak:.0f} GFLOP/s" if peak else "")
    )


def run_child(script: str, name: str, ctx: dict, env: dict[str, str] | None = None) -> dict:
    """Run `script --child name --ctx JSON` in its own process (a fresh interpreter: no warm caches or
    allocator state carried between contenders; `env` added to its environment) and return the JSON of its
    `RESULT ` line; exit with the child's error if it printed none."""
    import json
    import os
    import subprocess

    proc = subprocess.run(
        [sys.executable, script, "--child", name, "--ctx", json.dumps(ctx)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **(env or {})},
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"the {name} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])
