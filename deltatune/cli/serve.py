"""`deltatune serve --model M --adapter NAME=PATH ... [--adapter-dir DIR] [--host 127.0.0.1] [--port 8000]`:
an OpenAI-compatible server for one base model and many adapters (docs/serving.md)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from deltatune.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a base model and many adapters over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default=None, help="model folder, hub id or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--model-name", default=None, help="the `model` name that picks the base (default: the folder name)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="load the adapter folder PATH under NAME at start (repeatable)",
    )
    p.add_argument(
        "--adapter-dir",
        default=None,
        metavar="DIR",
        help="allow POST /v1/adapters to load folders under DIR (and only there) at run time",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows generated together in one batch")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this are answered 503")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens when a request gives none")
    p.add_argument(
        "--max-request-mb", type=float, default=16.0, help="request bodies larger than this are answered 413"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def parse_adapters(values: list[str]) -> list[tuple[str, Path]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {value!r}: expected NAME=PATH", field="adapter")
        pairs.append((name, Path(path)))
    return pairs


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserError("serving needs fastapi and uvicorn: pip install 'deltatune[serve]'") from exc

    from deltatune.models import DEFAULT_MODEL, DEFAULT_MODEL_ALIASES, load_model
    from deltatune.serve.adapters import MultiAdapterModel
    from deltatune.serve.engine import Engine
    from deltatune.serve.server import ServerState, create_app

    for flag, value in (
        ("--max-batch-size", args.max_batch_size),
        ("--max-queue", args.max_queue),
        ("--max-tokens", args.max_tokens),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}", field=flag)
    if not (math.isfinite(args.max_request_mb) and args.max_request_mb > 0):
        raise UserError(
            f"--max-request-mb must be a positive number, got {args.max_request_mb}", field="--max-request-mb"
        )
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0-65535 (0: any free port), got {args.port}", field="port")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}", field="threads")
    adapters = parse_adapters(args.adapter)
    adapter_dir = None
    if args.adapter_dir is not None:
        adapter_dir = Path(args.adapter_dir)
        if not adapter_dir.is_dir():
            raise UserError(f"{adapter_dir}: no such directory", field="adapter-dir")
    if args.threads:
        torch.set_num_threads(args.threads)
    sock = _bind(args.host, args.port)  # before the model loads: a busy port fails at once
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    multi = MultiAdapterModel(model)
    base_name = args.model_name or (
        DEFAULT_MODEL
        if args.model is None or str(args.model).lower() in DEFAULT_MODEL_ALIASES
        else _folder_name(str(args.model))
    )
    for name, path in adapters:
        if name == base_name:
            raise UserError(f"--adapter {name}: the name is the base model's; choose another", field="adapter")
        multi.load(name, path)
    state = ServerState(
        engine=Engine(multi, tokenizer),
        base_name=base_name,
        adapter_dir=adapter_dir,
        default_max_tokens=args.max_tokens,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_request_mb * 2**20),
    )
    port = sock.getsockname()[1]  # the port really bound (--port 0 picks a free one)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"deltatune serve: {base_name} with adapters [{', '.join(multi.names)}] on http://{host}:{port}/v1",
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning")).run(sockets=[sock])
    return 0


def _folder_name(model: str) -> str:
    """The base model's default `model` name: the folder's own name, also for `.` or `..` (whose
    `Path.name` is empty), else the last part of a hub id or file name."""
    path = Path(model)
    return (path.resolve().name if path.exists() else path.name) or model


def _bind(host: str, port: int):
    """The listening socket, bound here so that a busy port or bad host is one clear line."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", field="port") from None
    return sock
