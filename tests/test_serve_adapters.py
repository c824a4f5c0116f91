"""Named adapters on one base, and batched generation where each row names its own adapter.

The reference for every row is the adapter applied the ordinary way (deltatune.methods.apply.load_adapter
on a fresh copy of the base) and run alone through transformers' own `generate`, greedy."""

import pytest
import torch

from deltatune.errors import UserError
from deltatune.methods.apply import apply_methods, load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.serve import Engine, GenRequest, MultiAdapterLinear, MultiAdapterModel, SamplingParams
from deltatune.serve.testing import random_adapter
from deltatune.testing import tiny_model, tiny_tokenizer

SPECS = {
    "lora": MethodSpec(name="lora", rank=4, alpha=8),
    "lora8": MethodSpec(name="lora", rank=8, alpha=16, targets="q_proj,v_proj,o_proj"),
    "rslora": MethodSpec(name="rslora", rank=2, alpha=4, targets="q_proj,k_proj"),
    "dora": MethodSpec(name="dora", rank=4, alpha=8),
    "mora": MethodSpec(name="mora", rank=4, targets="q_proj,gate_proj,down_proj"),
    "mora1": MethodSpec(name="mora", rank=4, options={"mora_type": 1}),
    "ia3": MethodSpec(name="ia3"),
    "vera": MethodSpec(name="vera", rank=8, targets="q_proj,v_proj,down_proj"),
    "prompt": MethodSpec(name="prompt", options={"num_virtual_tokens": 3}),
    "lora-ia3": [MethodSpec(name="lora", rank=2, targets="q_proj,o_proj"), MethodSpec(name="ia3")],  # one folder
}
BASE = {"initializer_range": 0.2}  # larger random weights: greedy text that varies, not one repeated token


def base_model():
    return tiny_model(0, **BASE)


PROMPTS = ["What is 2 + 3?", "The quick brown fox", "Natalia sold clips to 48 of her friends", "user assistant"]
MAX_NEW = 12


def make_adapter(folder, spec: MethodSpec | list[MethodSpec], seed: int) -> None:
    """Save an adapter of `spec` with random non-zero weights (so it changes what the model says)."""
    random_adapter(folder, spec, base_model(), seed)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, spec) in enumerate(SPECS.items()):
        make_adapter(root / name, spec, seed=100 + i)
    return root


_MODELS: dict = {}


def reference(tok, folder, prompt: str) -> list[int]:
    """Greedy continuation by the adapter applied the ordinary way, run alone with transformers generate."""
    from deltatune.evaluate.generate import stop_token_ids

    if folder not in _MODELS:
        _MODELS[folder] = base_model() if folder is None else load_adapter(base_model(), folder).model
    model = _MODELS[folder]
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    stops = stop_token_ids(tok)
    if hasattr(model, "deltatune_prompt"):  # prompt tuning: greedy by hand, the whole sequence each step
        new = []
        with torch.no_grad():
            while len(new) < MAX_NEW:
                t = int(
                    model(input_ids=torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1].argmax()
                )
                if t in stops:
                    break
                new.append(t)
        return new
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
            temperature=None,
            top_p=None,
            top_k=None,
        )
    new = out[0, ids.shape[1] :].tolist()
    return [t for t in new if t not in stops][:MAX_NEW] if any(t in stops for t in new) else new


def served(dirs, names):
    multi = MultiAdapterModel(base_model())
    for n in names:
        multi.load(n, dirs / n)
    return multi


def test_each_row_equals_its_adapter_run_alone_for_every_method(adapter_dirs):
    tok = tiny_tokenizer()
    names = list(SPECS)
    multi = served(adapter_dirs, names)
    engine = Engine(multi, tok)
    rows = [(p, n) for i, p in enumerate(PROMPTS) for n in names[i % 2 :: 2] + [None]]
    reqs = [
        GenRequest(prompt_ids=engine.encode(p), adapter=n, params=SamplingParams(max_tokens=MAX_NEW)) for p, n in rows
    ]
    results = engine.generate(reqs)
    changed = set()
    for (prompt, name), res in zip(rows, results):
        want = reference(tok, adapter_dirs / name if name else None, prompt)
        assert res.token_ids == want, (prompt, name)
        if name is not None and want != reference(tok, None, prompt):
            changed.add(name)
    assert changed == set(names)  # every random adapter really changes what the model says


def test_every_method_alone_in_a_batch_of_its_own(adapter_dirs):
    """A uniform batch takes each method's own forward; two rows of one adapter plus a base row the mixed path."""
    tok = tiny_tokenizer()
    for name in SPECS:
        multi = served(adapter_dirs, [name])
        engine = Engine(multi, tok)
        for adapters in ([name, name], [name, None, name]):
            reqs = [
                GenRequest(prompt_ids=engine.encode(PROMPTS[k]), adapter=a, params=SamplingParams(max_tokens=MAX_NEW))
                for k, a in enumerate(adapters)
            ]
            got = [r.token_ids for r in engine.generate(reqs)]
            want = [reference(tok, adapter_dirs / a if a else None, PROMPTS[k]) for k, a in enumerate(adapters)]
            assert got == want, (name, adapters)


def test_mixed_batch_logits_match_each_adapter_alone(adapter_dirs):
    """One forward over rows of four LoRA/rsLoRA adapters (the gathered path), DoRA, MoRA, (IA)3 and the base:
    each row's logits equal that adapter's logits alone (fp32, to rounding)."""
    names = [n for n in SPECS if n != "prompt"] + [None]  # prompt tuning's tokens are added by the engine
    multi = served(adapter_dirs, [n for n in names if n])
    ids = torch.tensor([[1, 5, 77, 300, 12, 9, 45, 2]] * len(names))
    with torch.no_grad(), multi.route(names):
        mixed = multi.model(input_ids=ids).logits
    for k, name in enumerate(names):
        model = base_model() if name is None else load_adapter(base_model(), adapter_dirs / name).model
        with torch.no_grad():
            alone = model(input_ids=ids[:1]).logits[0]
        torch.testing.assert_close(mixed[k], alone, rtol=1e-5, atol=1e-5)


def test_load_activate_unload_by_name(adapter_dirs):
    base = base_model()
    ids = torch.tensor([[1, 5, 77, 300]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    multi = MultiAdapterModel(base)
    multi.load("a", adapter_dirs / "lora")
    multi.load("b", adapter_dirs / "dora")
    assert multi.names == ["a", "b"]
    layer = multi.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, MultiAdapterLinear) and list(layer.adapters) == ["a", "b"]
    assert layer.adapters["a"].base is layer.base is layer.adapters["b"].base  # one base weight, shared
    with torch.no_grad():
        assert torch.equal(multi.model(input_ids=ids).logits, base_logits)  # nothing activated: the base
        multi.activate("b")
        want_b = load_adapter(base_model(), adapter_dirs / "dora").model(input_ids=ids).logits
        assert torch.equal(multi.model(input_ids=ids).logits, want_b)
        multi.unload("b")
        assert multi.routing.default is None and multi.names == ["a"]
        assert torch.equal(multi.model(input_ids=ids).logits, base_logits)
        multi.unload("a")
    assert not any(isinstance(m, MultiAdapterLinear) for m in multi.model.modules())
    assert type(multi.model.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    with pytest.raises(UserError, match="no adapter named 'a'"):
        multi.unload("a")
    with pytest.raises(UserError, match="no adapter named 'zz'"):
        multi.activate("zz")


def test_bad_names_and_duplicates_are_refused(adapter_dirs):
    multi = MultiAdapterModel(base_model())
    multi.load("a", adapter_dirs / "lora")
    with pytest.raises(UserError, match="already loaded"):
        multi.load("a", adapter_dirs / "lora")
    for bad in ("", "../x", "a b", "x/y"):
        with pytest.raises(UserError, match="adapter name"):
            multi.load(bad, adapter_dirs / "lora")
    with pytest.raises(UserError, match="no adapter named 'nope'"):
        with multi.route(["a", "nope"]):
            pass


@pytest.mark.parametrize("method", ["prefix", "bitfit", "adapter"])
def test_methods_that_cannot_share_a_batch_are_refused_in_one_line(tmp_path, method):
    spec = MethodSpec(name=method, rank=4, options={"num_virtual_tokens": 2} if method in ("prefix", "prompt") else {})
    adapted = apply_methods(base_model(), [spec])
    adapted.save_adapter(tmp_path / method)
    multi = MultiAdapterModel(base_model())
    with pytest.raises(UserError, match=f"method '{method}' cannot be served") as exc:
        multi.load("x", tmp_path / method)
    assert "\n" not in str(exc.value)
    assert multi.names == [] and not any(isinstance(m, MultiAdapterLinear) for m in multi.model.modules())


def test_gpt2_conv1d_adapters_are_served_in_a_mixed_batch(tmp_path):
    """GPT-2's attention and MLP are Conv1D (weights stored transposed): adapters on them are served, and each
    row of a mixed batch (two plain LoRAs through the gathered path, DoRA, the base) equals its adapter alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        return GPT2LMHeadModel(config).eval()

    specs = {
        "a": MethodSpec(name="lora", rank=4, alpha=8),
        "b": MethodSpec(name="lora", rank=2, alpha=4, targets="c_attn"),
        "d": MethodSpec(name="dora", rank=4, alpha=8),
    }
    for i, (name, spec) in enumerate(specs.items()):
        random_adapter(tmp_path / name, spec, gpt2(), seed=i, std=0.05)
    multi = MultiAdapterModel(gpt2())
    for name in specs:
        multi.load(name, tmp_path / name)
    names = [*specs, None]
    ids = torch.tensor([[1, 5, 77, 300, 12, 9, 45, 2]] * len(names))
    with torch.no_grad(), multi.route(names):
        mixed = multi.model(input_ids=ids).logits
    for k, name in enumerate(names):
        model = gpt2() if name is None else load_adapter(gpt2(), tmp_path / name).model
        with torch.no_grad():
            alone = model(input_ids=ids[:1]).logits[0]
        torch.testing.assert_close(mixed[k], alone, rtol=1e-5, atol=1e-5)
