"""The real server over HTTP on 127.0.0.1, driven with the `openai` client: completions, chat, streaming,
two adapters at once, run-time adapter loading, and errors (which never take the server down)."""

import json
import os
import threading
import time

import httpx
import openai
import pytest
import torch

from deltatune.methods.apply import load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.serve import Engine, MultiAdapterModel
from deltatune.serve.batcher import Batcher, QueueFull
from deltatune.serve.engine import GenRequest, SamplingParams
from deltatune.serve.server import ServerState, create_app
from deltatune.serve.testing import random_adapter, running_server
from deltatune.testing import tiny_model, tiny_tokenizer

BASE = "tiny-base"
PROMPT = "The quick brown fox"


def base_model():
    return tiny_model(0, initializer_range=0.2)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("served")
    random_adapter(root / "alpha", MethodSpec(name="lora", rank=4, alpha=8), base_model(), seed=1)
    random_adapter(root / "beta", MethodSpec(name="dora", rank=4, alpha=8), base_model(), seed=2)
    random_adapter(root / "gamma", MethodSpec(name="ia3"), base_model(), seed=3)
    return root


def make_state(adapter_root, **kw) -> ServerState:
    multi = MultiAdapterModel(base_model())
    multi.load("alpha", adapter_root / "alpha")
    multi.load("beta", adapter_root / "beta")
    return ServerState(engine=Engine(multi, tiny_tokenizer()), base_name=BASE, adapter_dir=adapter_root, **kw)


@pytest.fixture(scope="module")
def server(adapter_root):
    state = make_state(adapter_root, default_max_tokens=16)
    with running_server(create_app(state)) as url:
        yield url, state


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


_REF: dict = {}


def reference(adapter_root, name, prompt_ids: list[int], max_new: int) -> str:
    """The adapter applied the ordinary way, alone, with transformers' generate (greedy), decoded."""
    from deltatune.evaluate.generate import stop_token_ids

    tok = tiny_tokenizer()
    if name not in _REF:
        _REF[name] = base_model() if name is None else load_adapter(base_model(), adapter_root / name).model
    ids = torch.tensor([prompt_ids])
    stops = stop_token_ids(tok)
    with torch.no_grad():
        out = _REF[name].generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def ids_of(text):
    return tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def test_models_lists_the_base_and_each_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == BASE and set(ids[1:]) >= {"alpha", "beta"}


def test_completion_per_adapter_equals_that_adapter_alone(client, adapter_root):
    texts = {}
    for name in (None, "alpha", "beta"):
        out = client.completions.create(model=name or BASE, prompt=PROMPT, max_tokens=10, temperature=0)
        assert out.choices[0].text == reference(adapter_root, name, ids_of(PROMPT), 10)
        assert out.usage.prompt_tokens == len(ids_of(PROMPT)) and out.usage.completion_tokens <= 10
        texts[name] = out.choices[0].text
    assert len(set(texts.values())) == 3  # the adapters really differ


def test_chat_uses_the_chat_template(client, adapter_root):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    out = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0)
    prompt = tiny_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference(adapter_root, "alpha", ids_of(prompt), 8)
    assert out.usage.prompt_tokens == len(ids_of(prompt))


def test_streaming_pieces_add_up_to_the_whole_answer(client):
    whole = client.completions.create(model="beta", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    pieces, finish = [], None
    for event in client.completions.create(model="beta", prompt=PROMPT, max_tokens=12, temperature=0, stream=True):
        pieces.append(event.choices[0].text)
        finish = event.choices[0].finish_reason or finish
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1 and finish in ("stop", "length")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    whole = client.chat.completions.create(model="beta", messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model="beta",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_two_adapters_and_the_base_at_once(client, adapter_root):
    results, errors = {}, []

    def ask(name):
        try:
            out = client.completions.create(model=name, prompt=PROMPT, max_tokens=10, temperature=0)
            results[name] = out.choices[0].text
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("alpha", "beta", BASE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in ("alpha", "beta"):
        assert results[name] == reference(adapter_root, name, ids_of(PROMPT), 10)
    assert results[BASE] == reference(adapter_root, None, ids_of(PROMPT), 10)


def test_requests_that_arrive_together_run_as_one_batch(adapter_root):
    multi = MultiAdapterModel(base_model())
    multi.load("alpha", adapter_root / "alpha")
    engine = Engine(multi, tiny_tokenizer())
    batcher = Batcher(engine, threading.Lock(), max_batch_size=8, max_queue=3)
    done = []
    reqs = [
        GenRequest(prompt_ids=ids_of(PROMPT), adapter=a, params=SamplingParams(max_tokens=3), on_finish=done.append)
        for a in ("alpha", None, "alpha")
    ]
    batcher.submit(reqs)  # queued before the worker starts: one batch takes them all
    with pytest.raises(QueueFull):
        batcher.submit([GenRequest(prompt_ids=[5])])
    batcher.start()
    deadline = time.monotonic() + 60
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.stop()
    assert len(done) == 3 and batcher.batches == 1 and engine.stats["tokens"] == 9


def test_stop_sequences_max_tokens_and_seeded_sampling(client):
    full = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    short = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    kw = dict(model="alpha", prompt=PROMPT, max_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    first, again = (client.completions.create(**kw).choices[0].text for _ in range(2))
    other = [client.completions.create(**{**kw, "seed": s}).choices[0].text for s in (8, 9, 10)]
    assert first == again and any(o != first for o in other)
    top1 = client.completions.create(**{**kw, "extra_body": {"top_k": 1}}).choices[0].text
    assert top1 == full  # top_k=1 leaves only the argmax


def test_prompt_lists_answer_in_order(client, adapter_root):
    prompts = [PROMPT, "What is 2 + 3?"]
    out = client.completions.create(model="alpha", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [reference(adapter_root, "alpha", ids_of(p), 6) for p in prompts]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": BASE, "prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
        ({"model": BASE, "prompt": PROMPT, "max_tokens": 10**9}, "max_tokens"),
        ({"model": BASE, "prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
        ({"model": BASE, "prompt": 5}, "prompt"),
        ({"model": BASE, "prompt": PROMPT, "temperature": "hot"}, "temperature"),
        ({"model": BASE, "prompt": PROMPT, "logprobs": True}, "logprobs"),
        ({"model": BASE, "prompt": PROMPT, "tools": []}, "tools"),
        ({"model": BASE, "prompt": PROMPT, "n": 2}, "n"),
        ({"model": BASE, "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": BASE, "prompt": "fox " * 600}, "prompt"),
        ({"prompt": PROMPT}, "model"),
    ],
)
def test_bad_completion_requests_get_an_openai_error(server, body, param):
    r = httpx.post(server[0] + "/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param and error_of(r)["type"] == "invalid_request_error"


def test_malformed_json_empty_messages_unknown_model_and_route(server, client):
    url = server[0]
    r = httpx.post(url + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in error_of(r)["message"]
    r = httpx.post(url + "/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(url + "/chat/completions", json={"model": BASE, "messages": []})
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = httpx.post(url + "/chat/completions", json={"model": BASE, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and error_of(r)["param"] == "messages.0.role"
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    assert exc.value.body["code"] == "model_not_found"
    r = httpx.get(url + "/nothing-here")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    # the server is still up and answering
    assert client.completions.create(model=BASE, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text is not None


def test_adapters_load_and_unload_at_run_time_only_from_the_adapter_dir(server, client, tmp_path, adapter_root):
    url, state = server
    r = httpx.post(url + "/adapters", json={"name": "g1", "path": "gamma"}, timeout=60)
    assert r.status_code == 201 and r.json()["id"] == "g1"
    got = client.completions.create(model="g1", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert got == reference(adapter_root, "gamma", ids_of(PROMPT), 8)
    assert httpx.post(url + "/adapters", json={"name": "g1", "path": "gamma"}).status_code == 409
    outside = tmp_path / "outside"
    random_adapter(outside, MethodSpec(name="ia3"), base_model(), seed=4)
    os.symlink(outside, adapter_root / "link-out")
    (adapter_root / "half").mkdir()
    os.symlink(outside / "adapter_model.safetensors", adapter_root / "half" / "adapter_model.safetensors")
    for path in ("../outside", str(outside), "link-out", "half", "alpha/../../outside", ""):
        r = httpx.post(url + "/adapters", json={"name": "bad", "path": path})
        assert r.status_code == 400, (path, r.text)
    assert httpx.post(url + "/adapters", json={"name": "x", "path": "missing"}).status_code == 404
    assert httpx.post(url + "/adapters", json={"name": "../x"}).status_code == 400
    assert httpx.post(url + "/adapters", json={"name": "x", "path": 3}).status_code == 400
    assert "bad" not in [m.id for m in client.models.list().data]
    r = httpx.delete(url + "/adapters/g1")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert httpx.delete(url + "/adapters/g1").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="g1", prompt=PROMPT, max_tokens=2)
    state.adapter_dir, before = None, state.adapter_dir
    try:
        assert httpx.post(url + "/adapters", json={"name": "g2", "path": "gamma"}).status_code == 403
    finally:
        state.adapter_dir = before


def test_a_full_queue_answers_503_and_the_rest_are_served(adapter_root):
    state = make_state(adapter_root, max_batch_size=1, max_queue=2)
    codes = []
    with running_server(create_app(state)) as url:

        def ask():
            r = httpx.post(url + "/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 2}, timeout=120)
            codes.append(r.status_code)
            if r.status_code == 503:
                assert error_of(r)["type"] == "overloaded_error"

        with state.lock:  # the worker blocks on its first batch; two more wait; the rest are refused
            threads = [threading.Thread(target=ask) for _ in range(5)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while codes.count(503) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        for t in threads:
            t.join()
    assert sorted(codes) == [200, 200, 200, 503, 503]


def test_cli_serve_answers_and_rejects_bad_flags(tiny_dir, adapter_root, tmp_path, capsys):
    import subprocess
    import sys

    from deltatune.cli import main

    assert main(["serve", "--model", str(tiny_dir), "--adapter", "no-equals-sign"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deltatune",
            "serve",
            "--model",
            str(tiny_dir),
            "--threads",
            "1",
            "--adapter",
            f"alpha={adapter_root / 'alpha'}",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == [tiny_dir.name, "alpha"]
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "alpha", "prompt": PROMPT, "max_tokens": 3},
            timeout=60,
        )
        assert r.status_code == 200 and json.loads(r.text)["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_streaming_client_that_goes_away_stops_its_row(adapter_root):
    state = make_state(adapter_root)
    state.engine.stop_ids = set()  # only max_tokens could end this row
    with running_server(create_app(state)) as url:
        body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 400, "stream": True}
        with httpx.stream("POST", url + "/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 60
        while state.engine.stats["seconds"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # the batch has ended (stats are written when generate returns)
        assert 0 < state.engine.stats["tokens"] < 400
        r = httpx.post(url + "/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
