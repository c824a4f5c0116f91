"""Review 6 of serving and generation: the first space of a continuation under SentencePiece tokenizers, an fp32
adapter over a bf16 base served as loaded, adapter configs of the wrong types, and JSON nested too deeply."""

import json

import httpx
import pytest
import torch

from deltatune.detokenize import continuation_text
from deltatune.methods.apply import load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.serve import Engine, MultiAdapterModel
from deltatune.serve.engine import GenRequest, SamplingParams, _Row
from deltatune.serve.server import ServerState, create_app
from deltatune.serve.testing import random_adapter, running_server
from deltatune.testing import tiny_model, tiny_sentencepiece_tokenizer, tiny_sliding_window_model, tiny_tokenizer

PROMPT = "The quick brown"


def _split(tok, prompt: str, whole: str) -> tuple[list[int], list[int]]:
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    whole_ids = tok(whole, add_special_tokens=False)["input_ids"]
    assert whole_ids[: len(prompt_ids)] == prompt_ids
    return prompt_ids, whole_ids[len(prompt_ids) :]


def test_a_continuation_keeps_its_first_space_under_a_sentencepiece_tokenizer():
    """Decoded alone, '▁fox ▁ju mps' lost its first space: prompt + completion read 'brownfox'."""
    tok = tiny_sentencepiece_tokenizer()
    prompt_ids, new = _split(tok, PROMPT, PROMPT + " fox jumps")
    assert tok.convert_ids_to_tokens(new)[0].startswith("\u2581") and tok.decode(new) == "fox jumps"
    assert continuation_text(tok, prompt_ids, new) == " fox jumps"
    assert continuation_text(tok, [], new) == "fox jumps"  # nothing before it: as decoded alone
    byte_level = tiny_tokenizer()
    prompt_ids, new = _split(byte_level, PROMPT, PROMPT + " fox jumps")
    assert continuation_text(byte_level, prompt_ids, new) == byte_level.decode(new) == " fox jumps"


def test_the_server_engine_streams_and_returns_the_first_space():
    tok = tiny_sentencepiece_tokenizer()
    prompt_ids, new = _split(tok, PROMPT, PROMPT + " fox jumps")
    pieces: list[str] = []
    row = _Row(GenRequest(prompt_ids, params=SamplingParams(max_tokens=len(new)), on_text=pieces.append), tok, set())
    for token in new:
        row.push(token)
    assert row.result().text == " fox jumps" and "".join(pieces) == " fox jumps"
    stopped = _Row(GenRequest(prompt_ids, params=SamplingParams(max_tokens=9, stop=(" ju",))), tok, set())
    for token in new:
        stopped.push(token)
    assert stopped.result().text == " fox" and stopped.finish == "stop"


def test_generate_returns_the_first_space_of_each_continuation(monkeypatch):
    """deltatune.evaluate.generate (eval, self-instruct, `deltatune generate`) decoded the same way: an indented
    first line of generated code lost a space under Llama 2's tokenizer."""
    from deltatune.evaluate.generate import GenerationConfig, generate

    tok = tiny_sentencepiece_tokenizer()
    prompt_ids, new = _split(tok, PROMPT, PROMPT + " fox jumps")
    model = tiny_model(vocab_size=len(tok))

    def scripted(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([new] * input_ids.shape[0])], dim=1)

    monkeypatch.setattr(model, "generate", scripted)
    (text,) = generate(model, tok, [PROMPT], GenerationConfig(max_new_tokens=len(new)), progress=False)
    assert text == " fox jumps"


def test_an_fp32_adapter_over_a_bf16_base_is_served_in_fp32(tmp_path):
    """load_adapter keeps an adapter's finer saved precision; the server rounded it to the base's bf16 (logits
    off by 0.01 from the same adapter loaded alone)."""
    folder = tmp_path / "fp32"
    random_adapter(folder, MethodSpec(name="lora", rank=2, alpha=4), tiny_model(0), seed=1, std=0.02)
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    alone = load_adapter(tiny_model(0, dtype=torch.bfloat16), folder).model
    multi = MultiAdapterModel(tiny_model(0, dtype=torch.bfloat16))
    multi.load("a", folder)
    layer = multi.model.model.layers[0].self_attn.q_proj
    assert layer.adapters["a"].lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        expected = alone(input_ids=ids).logits
        multi.activate("a")
        assert torch.equal(multi.model(input_ids=ids).logits, expected)
        with multi.route(["a", None]):
            routed = multi.model(input_ids=ids).logits
    assert torch.equal(routed[0], expected[0])


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("served6")
    good = random_adapter(root / "good", MethodSpec(name="lora", rank=4, alpha=8), tiny_model(0), seed=1)
    config = json.loads((good / "adapter_config.json").read_text())
    broken = {
        "r-text": {"r": "four"},
        "r-missing": {"r": None},
        "targets-number": {"target_modules": 5},
        "dropout-text": {"lora_dropout": "x"},
        "rslora-text": {"use_rslora": "false"},
    }
    for name, change in broken.items():
        (root / name).mkdir()
        (root / name / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        edited = {k: v for k, v in {**config, **change}.items() if v is not None}
        (root / name / "adapter_config.json").write_text(json.dumps(edited))
    state = ServerState(
        engine=Engine(MultiAdapterModel(tiny_model(0)), tiny_tokenizer()), base_name="b", adapter_dir=root
    )
    with running_server(create_app(state)) as url:
        yield url, broken


def test_adapter_configs_of_the_wrong_types_are_400_naming_the_field(server):
    """int("four"), a missing "r" and a number as target_modules were 500s with a logged traceback, and
    "use_rslora": "false" was read as true (rsLoRA's scaling, silently)."""
    url, broken = server
    fields = {
        "r-text": "'r'",
        "r-missing": "'r'",
        "targets-number": "'target_modules'",
        "dropout-text": "'lora_dropout'",
        "rslora-text": "'use_rslora'",
    }
    for name in broken:
        r = httpx.post(url + "/adapters", json={"name": name, "path": name}, timeout=60)
        assert r.status_code == 400, (name, r.text)
        assert fields[name] in r.json()["error"]["message"], (name, r.text)
    assert httpx.post(url + "/adapters", json={"name": "good", "path": "good"}, timeout=60).status_code == 201


def test_json_nested_too_deeply_is_a_400(server):
    url, _ = server
    body = '{"model": "b", "prompt": "x", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(url + "/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def test_prompt_tuning_on_a_sliding_window_model_serves_each_row_as_alone(tmp_path):
    """generate() gave a padded row other text on such a model (the window counts cache slots); the server's own
    batching keeps each row's positions and mask, and must go on doing so."""
    random_adapter(
        tmp_path / "p",
        MethodSpec(name="prompt", options={"num_virtual_tokens": 4}),
        tiny_sliding_window_model(),
        seed=1,
    )
    multi = MultiAdapterModel(tiny_sliding_window_model())
    multi.load("p", tmp_path / "p")
    engine = Engine(multi, tiny_tokenizer())
    prompts = ["The quick brown fox jumps over the lazy dog. What is", "Hi", "Natalia sold clips to 48 of her", "abc"]

    def request(prompt):
        return GenRequest(engine.encode(prompt), adapter="p", params=SamplingParams(max_tokens=16, temperature=0))

    alone = [engine.generate([request(p)])[0].text for p in prompts]
    assert [r.text for r in engine.generate([request(p) for p in prompts])] == alone
