"""Serving defects found in review, each pinned by a test: a bad seed failing other users' requests, a
non-streaming client that goes away still holding its rows, GET /v1/models/{id}, error fields, and CLI
flags that ended in a traceback."""

import threading
import time

import httpx
import openai
import pytest

from deltatune.methods.base import MethodSpec
from deltatune.serve import Engine, MultiAdapterModel
from deltatune.serve.batcher import Batcher
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
    root = tmp_path_factory.mktemp("review")
    random_adapter(root / "alpha", MethodSpec(name="lora", rank=4, alpha=8), base_model(), seed=1)
    return root


def make_state(adapter_root, **kw) -> ServerState:
    multi = MultiAdapterModel(base_model())
    multi.load("alpha", adapter_root / "alpha")
    return ServerState(engine=Engine(multi, tiny_tokenizer()), base_name=BASE, adapter_dir=adapter_root, **kw)


@pytest.fixture(scope="module")
def server(adapter_root):
    state = make_state(adapter_root, default_max_tokens=8, max_queue=4)
    with running_server(create_app(state)) as url:
        yield url, state


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_a_seed_out_of_range_is_refused_alone_and_does_not_fail_its_batch(server):
    url, state = server
    codes = {}

    def ask(key, seed):
        body = {"model": BASE, "prompt": PROMPT, "max_tokens": 3, "temperature": 1.0, "seed": seed}
        codes[key] = httpx.post(url + "/completions", json=body, timeout=60)

    with state.lock:  # both requests wait for the worker and would run as one batch
        threads = [threading.Thread(target=ask, args=a) for a in (("good", 7), ("bad", 2**64))]
        for t in threads:
            t.start()
        time.sleep(0.3)
    for t in threads:
        t.join()
    assert codes["good"].status_code == 200, codes["good"].text
    assert codes["bad"].status_code == 400 and error_of(codes["bad"])["param"] == "seed"
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)


def test_a_request_the_engine_cannot_run_fails_alone_in_the_batcher(adapter_root):
    engine = make_state(adapter_root).engine
    done, failed = [], []
    good = GenRequest(prompt_ids=[5, 6], params=SamplingParams(max_tokens=2), on_finish=done.append)
    bad = GenRequest(prompt_ids=[5] * 600, params=SamplingParams(max_tokens=2), on_error=failed.append)
    batcher = Batcher(engine, threading.Lock(), max_batch_size=8)
    batcher.submit([good, bad])  # queued before the worker starts: one batch takes both
    batcher.start()
    deadline = time.monotonic() + 60
    while not (done and failed) and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.stop()
    assert len(done) == 1 and len(failed) == 1 and "context" in str(failed[0])


def test_a_non_streaming_client_that_goes_away_stops_its_row(adapter_root):
    state = make_state(adapter_root)
    state.engine.stop_ids = set()  # only max_tokens could end this row
    forward = state.engine._forward

    def slow(*a, **kw):
        time.sleep(0.01)  # 400 steps take at least 4 s: far longer than the client waits
        return forward(*a, **kw)

    state.engine._forward = slow
    with running_server(create_app(state)) as url:
        body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 400}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 60
        while state.engine.stats["seconds"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # the batch has ended (stats are written when generate returns)
        assert 0 < state.engine.stats["tokens"] < 400


def test_models_retrieve_answers_each_model_and_404_for_others(server):
    client = openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)
    assert client.models.retrieve(BASE).id == BASE
    card = client.models.retrieve("alpha")
    assert card.id == "alpha" and card.object == "model" and card.owned_by == "deltatune"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.body["code"] == "model_not_found"


def test_max_completion_tokens_over_the_context_names_that_field(server):
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}
    r = httpx.post(server[0] + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and error_of(r)["param"] == "max_completion_tokens"
    assert error_of(r)["message"].startswith("max_completion_tokens ")


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_busy_503(server):
    url, state = server
    body = {"model": BASE, "prompt": [PROMPT] * (state.max_queue + 1), "max_tokens": 2}
    r = httpx.post(url + "/completions", json=body, timeout=60)
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    body["prompt"] = [PROMPT] * state.max_queue
    assert httpx.post(url + "/completions", json=body, timeout=60).status_code == 200


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port must be in 0-65535"),
        (["--threads", "-1"], "--threads must be at least 1"),
        (["--max-request-mb", "0"], "--max-request-mb must be a positive number"),
    ],
)
def test_cli_serve_bad_port_or_threads_is_one_line(flags, message, capsys):
    from deltatune.cli import main

    assert main(["serve", "--model", "unused", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_serve_names_the_base_after_the_folder_and_prints_the_bound_port(tiny_dir, monkeypatch, capsys, one_thread):
    import uvicorn

    from deltatune.cli import main

    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.update(app=self.config.app))
    monkeypatch.chdir(tiny_dir)
    assert main(["serve", "--model", ".", "--port", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    state = served["app"].state.serve
    assert state.base_name == tiny_dir.name
    assert f"deltatune serve: {tiny_dir.name} " in out and ":0/v1" not in out


def test_completions_prompts_get_the_tokenizers_bos_and_chat_prompts_do_not_get_a_second():
    """Raw prompts are encoded as `deltatune eval` and vLLM encode them: with the BOS a Llama-style tokenizer
    adds (a model trained with BOS in front sees it at inference too); a chat template that writes BOS itself
    is not given a second one."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    plain = Engine(MultiAdapterModel(base_model()), tok).encode(PROMPT)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>"))]
    )
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    engine = Engine(MultiAdapterModel(base_model()), tok)
    bos = tok.bos_token_id
    assert engine.encode(PROMPT) == [bos] + plain
    chat = engine.encode_chat([{"role": "user", "content": PROMPT}])
    assert chat[0] == bos and chat[1] != bos


def test_the_engine_stops_at_the_models_own_end_of_turn_ids():
    """A model whose generation config lists an end id the tokenizer does not name (Gemma's <end_of_turn>)."""
    model = base_model()
    model.generation_config.eos_token_id = [2, 77]
    engine = Engine(MultiAdapterModel(model), tiny_tokenizer())
    assert 77 in engine.stop_ids


def test_a_request_body_over_the_limit_is_a_413_declared_or_streamed(adapter_root):
    """The server refuses a body past --max-request-mb whether its Content-Length says so or it streams in
    chunks with no length; a body under the limit is served."""
    import json

    state = make_state(adapter_root, default_max_tokens=2, max_body_bytes=4096)
    big = json.dumps({"model": BASE, "prompt": "word " * 1000, "max_tokens": 2}).encode()
    assert len(big) > 4096
    with running_server(create_app(state)) as url:
        declared = httpx.post(url + "/completions", content=big, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and "over 4096 bytes" in error_of(declared)["message"]

        def chunks():
            for i in range(0, len(big), 512):
                yield big[i : i + 512]

        streamed = httpx.post(url + "/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "over 4096 bytes" in error_of(streamed)["message"]
        small = {"model": BASE, "prompt": PROMPT, "max_tokens": 2}
        assert httpx.post(url + "/completions", json=small, timeout=60).status_code == 200


def test_stream_options_without_streaming_is_a_400_naming_it(server):
    """OpenAI refuses `stream_options` on a request that does not stream; it was accepted and ignored."""
    url, _ = server
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 2, "stream_options": {"include_usage": True}}
    r = httpx.post(url + "/completions", json=body, timeout=60)
    assert r.status_code == 400 and error_of(r)["param"] == "stream_options"
    assert "only allowed when stream is true" in error_of(r)["message"]
