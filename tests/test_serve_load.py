"""Bounded load test on loopback: 32 concurrent clients for a few seconds, mixing adapters, chat, completions
and streaming; every request is answered (200, or a 503 when the queue is full) and none is lost."""

import asyncio
import time

import httpx
import pytest
import torch

from deltatune.methods.base import MethodSpec
from deltatune.serve import Engine, MultiAdapterModel
from deltatune.serve.server import ServerState, create_app
from deltatune.serve.testing import random_adapter, running_server
from deltatune.testing import tiny_model, tiny_tokenizer

CLIENTS = 32
SECONDS = 6.0


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_32_concurrent_clients_every_request_answered(tmp_path, one_thread):
    multi = MultiAdapterModel(tiny_model(0))
    for i, spec in enumerate(
        [MethodSpec(name="lora", rank=4), MethodSpec(name="lora", rank=8), MethodSpec(name="ia3")]
    ):
        multi.load(f"a{i}", random_adapter(tmp_path / f"a{i}", spec, tiny_model(0), seed=i))
    state = ServerState(engine=Engine(multi, tiny_tokenizer()), base_name="base", max_batch_size=16, max_queue=24)
    models = ["base", "a0", "a1", "a2"]
    sent, answered, bad = [0], {}, []

    async def client(k: int, url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            j = 0
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline:
                model = models[(k + j) % len(models)]
                body = {"model": model, "max_tokens": 1 + (k + j) % 6, "temperature": 0.7 * (j % 2), "seed": j}
                stream = (k + j) % 3 == 0
                if (k + j) % 2:
                    path, body = "/chat/completions", {**body, "messages": [{"role": "user", "content": f"Q{k}.{j}"}]}
                else:
                    path, body = "/completions", {**body, "prompt": f"The quick brown fox {k} {j}"}
                sent[0] += 1
                if stream:
                    async with http.stream("POST", path, json={**body, "stream": True}) as r:
                        lines = [line async for line in r.aiter_lines() if line]
                        ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                        code = r.status_code
                else:
                    r = await http.post(path, json=body)
                    code = r.status_code
                    ok = code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                answered[code] = answered.get(code, 0) + 1
                if not ok and code != 503:
                    bad.append((code, path, body))
                if code == 503:
                    await asyncio.sleep(0.05)
                j += 1

    with running_server(create_app(state)) as url:

        async def main():
            await asyncio.gather(*(client(k, url) for k in range(CLIENTS)))

        asyncio.run(main())
        served_rows = state.engine.stats["tokens"]
    assert not bad, bad[:3]
    assert sum(answered.values()) == sent[0]  # every request got an answer
    assert answered.get(200, 0) >= CLIENTS  # and most were served (503s only while the queue was full)
    assert set(answered) <= {200, 503}
    assert served_rows >= answered[200]
