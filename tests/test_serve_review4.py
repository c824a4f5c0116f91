"""Review of serving (fourth pass): each test failed before its fix."""

from __future__ import annotations

import httpx
import pytest
from test_serve_review import BASE, PROMPT, error_of, make_state  # noqa: F401  (fixtures below)
from test_serve_review import adapter_root as adapter_root  # noqa: F401
from test_serve_review import server as server  # noqa: F401

from deltatune.serve.server import create_app
from deltatune.serve.testing import running_server


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/completions", json=body, timeout=60)


def test_a_tiny_temperature_decodes_greedily_and_fails_no_batch(server):
    """temperature 1e-45 passed validation, the sampler's probabilities became NaN and the whole batch (other
    clients' rows too) got a 500. It now decodes as greedy, as vLLM does."""
    url, _ = server
    greedy = post(url, {"model": BASE, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    tiny = post(url, {"model": BASE, "prompt": PROMPT, "max_tokens": 4, "temperature": 1e-45})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_nulls_and_no_op_openai_fields_are_accepted_and_logprobs_0_is_refused(server):
    """Clients such as LiteLLM send explicit nulls and no-op values (best_of 1, an empty logit_bias, a text
    response_format, store false): each was a 400. `logprobs: 0` (the chosen tokens' log-probabilities) was
    accepted and ignored, since 0 == False."""
    url, _ = server
    fields = {"temperature": None, "top_p": None, "n": None, "stream": None, "tools": None, "logit_bias": {},
              "best_of": 1, "response_format": {"type": "text"}, "store": False, "metadata": {"k": "v"}}  # fmt: skip
    plain = post(url, {"model": BASE, "prompt": PROMPT, "max_tokens": 3, "seed": 5})  # temperature 1: seeded
    with_fields = post(url, {"model": BASE, "prompt": PROMPT, "max_tokens": 3, "seed": 5, **fields})
    assert with_fields.status_code == 200, with_fields.text
    assert with_fields.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    refused = post(url, {"model": BASE, "prompt": PROMPT, "max_tokens": 3, "logprobs": 0})
    assert refused.status_code == 400 and error_of(refused)["param"] == "logprobs"
    for field, value in (("best_of", 2), ("logit_bias", {"5": 1.0}), ("response_format", {"type": "json_object"})):
        r = post(url, {"model": BASE, "prompt": PROMPT, field: value})
        assert r.status_code == 400 and error_of(r)["param"].startswith(field), (field, r.text)


@pytest.mark.parametrize("field", ["prompt", "model"])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, field):
    """JSON's "\\ud800" decodes to a string UTF-8 cannot encode: the tokenizer (prompt) or the 404 answer itself
    (model) raised, and the client got a 500."""
    url, _ = server
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 2, field: "ab\ud800"}
    r = httpx.post(
        url + "/completions",
        content=__import__("json").dumps(body).encode(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400 and error_of(r)["param"] == field and "lone surrogate" in error_of(r)["message"]


def test_unloading_an_adapter_without_adapter_dir_is_refused(adapter_root):  # noqa: F811
    """POST /v1/adapters answered 403 without --adapter-dir, but DELETE removed the startup adapters (and they
    could not be loaded back)."""
    state = make_state(adapter_root)
    state.adapter_dir = None
    with running_server(create_app(state)) as url:
        r = httpx.delete(url + "/adapters/alpha", timeout=60)
        assert r.status_code == 403 and error_of(r)["type"] == "permission_error"
        assert "alpha" in state.multi.names


def test_unsupported_values_say_what_is_unsupported_and_a_message_name_is_refused():
    """`n: 2` answered pydantic's "Input should be less than or equal to 1"; token-id prompts "Input should be a
    valid string"; `messages[].name` was accepted and dropped, though it changes OpenAI's answer."""
    from deltatune.serve.protocol import APIError, ChatRequest, CompletionRequest, parse

    cases = [
        (CompletionRequest, {"model": "m", "prompt": "x", "n": 2}, "n", "only n=1"),
        (CompletionRequest, {"model": "m", "prompt": [1, 2, 3]}, "prompt", "token-id prompts"),
        (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name",
         "participant's name"),
    ]  # fmt: skip
    for model, body, param, message in cases:
        with pytest.raises(APIError) as refused:
            parse(model, body)
        assert refused.value.param == param and message in refused.value.message
    parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x", "name": None}]})
    from deltatune.serve.protocol import AdapterLoadRequest

    with pytest.raises(APIError) as refused:  # an adapter's `name` is not a chat participant's
        parse(AdapterLoadRequest, {"name": 5})
    assert refused.value.param == "name" and "participant" not in refused.value.message


def test_an_internal_error_is_a_500_that_keeps_the_connection(adapter_root, monkeypatch):  # noqa: F811
    """Starlette's handler for Exception answered the 500 and re-raised, so uvicorn closed the keep-alive
    connection and the client's next request on it was reset (9 times in 20)."""
    state = make_state(adapter_root)
    real = state.engine.encode
    calls = {"n": 0}

    def encode_failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(state.engine, "encode", encode_failing_once)
    with running_server(create_app(state)) as url, httpx.Client(timeout=60) as client:
        body = {"model": BASE, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        first = client.post(url + "/completions", json=body)
        assert first.status_code == 500 and error_of(first)["type"] == "server_error"
        assert "boom" in error_of(first)["message"]
        second = client.post(url + "/completions", json=body)  # the same connection
        assert second.status_code == 200
        assert client.post(url + "/completions", json=body).status_code == 200


def test_an_adapter_load_error_shows_paths_as_the_client_named_them(adapter_root, tmp_path):  # noqa: F811
    """A broken adapter folder's error quoted the server's absolute path (its users, its disks) to the client."""
    import json
    import shutil

    root = tmp_path / "srv-secret-layout"
    shutil.copytree(adapter_root, root)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    shutil.copytree(root / "alpha", root / "noweights")
    (root / "noweights" / "adapter_model.safetensors").unlink()
    shutil.copytree(root / "alpha", root / "enormous")  # a rank of 2**40: refused before anything is allocated
    config = json.loads((root / "enormous" / "adapter_config.json").read_text())
    (root / "enormous" / "adapter_config.json").write_text(json.dumps({**config, "r": 2**40}))
    state = make_state(root)
    with running_server(create_app(state)) as url:
        for name in ("broken", "noweights", "enormous"):
            r = httpx.post(url + "/adapters", json={"name": name}, timeout=60)
            message = error_of(r)["message"]
            assert r.status_code == 400 and f"{name}/adapter_" in message, message
            assert "srv-secret-layout" not in message and str(tmp_path) not in message, message
        assert "has shape" in message and state.multi.names == ["alpha"]


def test_a_prompt_tuning_rows_context_error_counts_its_virtual_tokens_apart(tmp_path):
    """usage.prompt_tokens counts the client's tokens; the context error said "the prompt has N tokens" with the
    adapter's virtual tokens inside N, a number the client could not reconcile with its own count."""
    from test_serve_review import base_model

    from deltatune.methods.base import MethodSpec
    from deltatune.serve import Engine, MultiAdapterModel
    from deltatune.serve.server import ServerState
    from deltatune.serve.testing import random_adapter
    from deltatune.testing import tiny_tokenizer

    random_adapter(tmp_path / "soft", MethodSpec(name="prompt", options={"num_virtual_tokens": 5}), base_model(), 1)
    multi = MultiAdapterModel(base_model())
    multi.load("soft", tmp_path / "soft")
    state = ServerState(engine=Engine(multi, tiny_tokenizer()), base_name=BASE, adapter_dir=tmp_path)
    n = len(tiny_tokenizer()(PROMPT)["input_ids"])
    with running_server(create_app(state)) as url:
        ok = post(url, {"model": "soft", "prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == n
        room = state.engine.context - n - 5
        over = post(url, {"model": "soft", "prompt": PROMPT, "max_tokens": room + 1})
        message = error_of(over)["message"]
        assert over.status_code == 400 and error_of(over)["code"] == "context_length_exceeded"
        assert f"plus the prompt's {n} tokens (and the adapter's 5 virtual tokens) exceed" in message, message
    from deltatune.serve.protocol import CompletionRequest, parse
    from deltatune.serve.server import _params

    fits = parse(CompletionRequest, {"model": "soft", "prompt": PROMPT, "max_tokens": room})
    assert _params(state, fits, n, 5).max_tokens == room  # exactly the room left: accepted


def test_a_relative_adapter_dir_does_not_garble_load_errors(tmp_path, monkeypatch):
    """With `--adapter-dir .` every "." of a load error became "the adapter directory" (and with `ad`, "bad" and
    "adapter_config" were mangled): only the directory's absolute path is taken out."""
    from pathlib import Path

    from deltatune.serve.server import as_the_client_sees_it

    monkeypatch.chdir(tmp_path)
    for root in (Path("."), Path("ad")):
        where = str(root.resolve())
        message = f"{where}/bad/adapter_config.json: invalid JSON: Expecting value. (line 1)"
        assert (
            as_the_client_sees_it(message, root) == "bad/adapter_config.json: invalid JSON: Expecting value. (line 1)"
        )
