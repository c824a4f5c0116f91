"""Helpers for tests and benchmarks: adapters with random non-zero weights, and a real server on a free
loopback port in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


def random_adapter(folder: str | Path, spec, base: torch.nn.Module, seed: int, std: float = 0.3) -> Path:
    """Apply `spec` (one MethodSpec or a list) to `base` (changed in place), add N(0, std^2) noise to every
    trained tensor (so the adapter really changes the output), and save it; (IA)3 vectors get N(0, 1)
    noise around their ones."""
    from deltatune.methods.apply import apply_methods
    from deltatune.methods.base import MethodSpec

    specs = spec if isinstance(spec, list) else [spec]
    adapted = apply_methods(base, [MethodSpec(**s.to_dict()) for s in specs])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for method in adapted.methods:
            for _, p in method.trainable_parameters(adapted.model):
                p.add_(
                    torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
                    * (1.0 if method.name == "ia3" else std)
                )
    adapted.save_adapter(folder)
    return Path(folder)


@contextmanager
def running_server(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of `host` in a thread; yields the base URL (".../v1")."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
