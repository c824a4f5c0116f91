"""Does every thread work on the step's matrix products? Speed by row count, all threads against one.

A LoRA step's frozen base products are [M, K] x [K, N] with M the micro-batch's tokens (~800 in the main
benchmark) and (K, N) from the model: for SmolLM2-135M (576, 576) for q and o, (576, 192) for k and v, (576, 1536)
for gate and up, (1536, 576) for down, and the same pairs swapped for the input gradients. The isolated timings
that `roofline.py` takes hide how oneDNN splits a product among threads: for some shapes its partition leaves
threads idle, and the product then runs no faster with all threads than with one.

For each (K, N) and each M from `--min-rows` to `--max-rows` by `--row-step`, in the training precision, three
timings interleaved (median of `--repeats`, each over `--iters` calls): `torch.mm` with the process's threads, the
same with one thread, and the product computed as two row halves (multiples of 32 rows) with all threads, each
half written in place into one output. The table gives TFLOP/s with all threads, the speed-up over one thread and
the halves' speed-up over the whole product; rows where all threads run less than `--idle` x one thread are
listed as idle zones.

    python benchmarks/matmul_threads.py [--pairs 576x576,1536x576] [--min-rows 128] [--max-rows 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record, native_precision, seconds_per_call  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "matmul_threads.json"
STEP_PAIRS = "576x576,576x192,192x576,576x1536,1536x576"  # SmolLM2-135M's (K, N), forward and input gradients
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def halves(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b as two row blocks (the first a multiple of 32 rows), each written into its rows of `out`."""
    h = (a.shape[0] // 2 + 31) // 32 * 32
    torch.mm(a[:h], b, out=out[:h])
    torch.mm(a[h:], b, out=out[h:])
    return out


def measure(m: int, k: int, n: int, dtype: torch.dtype, threads: int, repeats: int, iters: int) -> dict:
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, k, dtype=dtype).t()  # nn.Linear's weight, as F.linear reads it
    out = torch.empty(m, n, dtype=dtype)  # every variant writes into it: no allocation in any timing
    variants = {
        "all": (threads, lambda: torch.mm(a, b, out=out)),
        "one": (1, lambda: torch.mm(a, b, out=out)),
        "halves": (threads, lambda: halves(a, b, out)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, (t, fn) in variants.items():  # first calls build oneDNN's kernels for the shape
        torch.set_num_threads(t)
        seconds_per_call(fn, 3)
    for _ in range(repeats):
        for name, (t, fn) in variants.items():
            torch.set_num_threads(t)
            times[name].append(seconds_per_call(fn, iters))
    torch.set_num_threads(threads)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "m": m,
        "tflops": 2 * m * k * n / med["all"] / 1e12,
        "x_one_thread": med["one"] / med["all"],
        "halves_speedup": med["all"] / med["halves"],
        "seconds": med,
    }


def idle_zones(rows: list[dict], idle: float) -> list[tuple[int, int]]:
    """Runs of consecutive row counts where all threads gained less than `idle` x one thread."""
    zones: list[tuple[int, int]] = []
    for r in rows:
        if r["x_one_thread"] < idle:
            if zones and zones[-1][1] == r["prev_m"]:
                zones[-1] = (zones[-1][0], r["m"])
            else:
                zones.append((r["m"], r["m"]))
    return zones


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default=STEP_PAIRS, help="KxN pairs, comma-separated")
    parser.add_argument("--min-rows", type=int, default=128)
    parser.add_argument("--max-rows", type=int, default=2048)
    parser.add_argument("--row-step", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--idle", type=float, default=1.2, help="below this speed-up over one thread: idle")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if min(args.min_rows, args.row_step, args.repeats, args.iters) < 1 or args.max_rows < args.min_rows:
        parser.error("rows, repeats and iterations must be at least 1, and --max-rows at least --min-rows")
    machine = machine_record(measure_peak=False)
    precision = native_precision(machine) if args.precision == "auto" else args.precision
    threads = torch.get_num_threads()
    print(f"machine: {describe(machine)}; {precision}, {threads} threads")
    if threads < 2:
        parser.error("one thread: nothing to compare (run with 2 or more)")
    results = {}
    for pair in args.pairs.split(","):
        k, n = (int(v) for v in pair.split("x"))
        rows, prev = [], None
        print(f"\nK={k} N={n}: {'M':>6s} {'TFLOP/s':>8s} {'x 1 thread':>10s} {'halves':>7s}")
        for m in range(args.min_rows, args.max_rows + 1, args.row_step):
            r = measure(m, k, n, DTYPES[precision], threads, args.repeats, args.iters)
            r["prev_m"] = prev
            prev = m
            rows.append(r)
            flag = "  idle" if r["x_one_thread"] < args.idle else ""
            print(
                f"{'':9s}{m:6d} {r['tflops']:8.2f} {r['x_one_thread']:10.2f} {r['halves_speedup']:7.2f}{flag}",
                flush=True,
            )
        zones = idle_zones(rows, args.idle)
        print(f"  idle zones (rows): {', '.join(f'{a}-{b}' for a, b in zones) or 'none'}")
        results[pair] = {"rows": rows, "idle_zones": zones}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line(), "machine": machine, "precision": precision, "threads": threads}
    Path(args.out).write_text(json.dumps({**record, "idle_below": args.idle, "pairs": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
