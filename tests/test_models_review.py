"""Review tests: model loading, saving, atomic writes and batched generation."""

from __future__ import annotations

import torch

from deltatune.evaluate.generate import GenerationConfig, generate
from deltatune.testing import tiny_model, tiny_tokenizer

PROMPTS = ["hello there", "the cat sat on the mat and then", "a", "why is the sky blue? The answer is"]


def test_a_sampled_prompt_gives_the_same_text_alone_and_in_any_batch():
    model, tok = tiny_model(), tiny_tokenizer()
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.95, seed=3)
    alone = [generate(model, tok, [p], cfg, progress=False)[0] for p in PROMPTS]
    assert generate(model, tok, PROMPTS, cfg, batch_size=4, progress=False) == alone
    assert generate(model, tok, PROMPTS, cfg, batch_size=1, progress=False) == alone
    assert generate(model, tok, PROMPTS[::-1], cfg, batch_size=3, progress=False) == alone[::-1]
    # repeats of one prompt (pass@k samples) still differ; another seed gives other texts
    repeats = generate(model, tok, [PROMPTS[1]] * 4, cfg, progress=False)
    assert repeats[0] == alone[1] and len(set(repeats)) > 1
    assert (
        generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=12, do_sample=True, seed=4), progress=False)
        != alone
    )


def test_sampling_draws_from_the_models_distribution():
    model, tok = tiny_model(), tiny_tokenizer()
    ids = tok("the cat", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float() / 0.15
    kth = logits.topk(50).values[-1]  # transformers' default top-k, as generate(do_sample=True) applies it
    probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    n = 3000
    cfg = GenerationConfig(max_new_tokens=1, do_sample=True, temperature=0.15, seed=0)
    texts = generate(model, tok, ["the cat"] * n, cfg, batch_size=1000, progress=False)
    top = int(probs.argmax())
    expected = float(probs[top])
    got = sum(t == tok.decode([top]) for t in texts) / n
    assert abs(got - expected) < 4 * (expected * (1 - expected) / n) ** 0.5 + 0.01, (got, expected)


def _failing_final_rename(monkeypatch, out, exc=OSError("disk went away")):
    """os.replace raises when it would move a temporary folder onto `out` (once)."""
    import os

    real = os.replace
    state = {"failed": False}

    def fake(src, dst):
        if not state["failed"] and ".tmp." in str(src) and str(dst) == str(out):
            state["failed"] = True
            raise exc
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fake)


def test_atomic_dir_keeps_the_old_folder_when_the_final_rename_fails(tmp_path, monkeypatch):
    import pytest

    from deltatune.fileio import atomic_dir

    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")
    _failing_final_rename(monkeypatch, out)
    from deltatune.errors import UserError

    with pytest.raises(UserError, match="model: cannot put the result there .*disk went away"):  # the user's path
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left behind


def test_atomic_dir_when_another_writer_creates_the_folder_meanwhile(tmp_path, monkeypatch):
    """Two processes converting the default model at once: both see no folder, the first renames its own into
    place, the second's rename then meets a full folder. It must replace it, not crash."""
    import os

    from deltatune.fileio import atomic_dir

    out = tmp_path / "model"
    real, raced = os.replace, []

    def racing(src, dst):
        if ".tmp." in str(src) and str(dst) == str(out) and not raced:
            raced.append(1)
            out.mkdir()
            (out / "weights").write_text("other writer")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", racing)
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("mine")
    assert (out / "weights").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_flushes_files_to_disk_before_renaming(tmp_path, monkeypatch):
    import os

    from deltatune.fileio import atomic_dir

    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "model.safetensors").write_text("weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    assert any(s.endswith("model.safetensors") for s in synced)
    assert any(s.endswith("config.json") for s in synced)


def _fake_conversion(monkeypatch, tmp_path, delay=0.0):
    import time

    from deltatune import models

    calls = []
    gguf = tmp_path / "fake.gguf"
    gguf.write_text("gguf")

    def convert(path, out):
        calls.append(out)
        from deltatune.fileio import atomic_dir

        with atomic_dir(out) as tmp:
            time.sleep(delay)
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_text(f"weights {len(calls)}")
        return out

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "convert_gguf", convert)
    return calls


def test_two_processes_needing_the_default_model_convert_it_once(tmp_path, monkeypatch):
    import threading

    from deltatune import models

    calls = _fake_conversion(monkeypatch, tmp_path, delay=0.3)
    results, errors = [], []

    def worker():
        try:
            target = models.default_model_dir()
            results.append((target / "model.safetensors").read_text())
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1, f"converted {len(calls)} times"
    assert results == ["weights 1"] * 3


def test_a_conversion_killed_half_way_leaves_nothing_that_is_kept(tmp_path, monkeypatch):
    from deltatune import models

    calls = _fake_conversion(monkeypatch, tmp_path)
    models_dir = tmp_path / "cache" / "models"
    stale = models_dir / f".{models.DEFAULT_MODEL}.tmp.abc123"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half")  # what a SIGKILL during the save leaves
    target = models.default_model_dir()
    assert (target / "model.safetensors").read_text() == "weights 1" and len(calls) == 1
    assert not stale.exists()


def _saved_tiny(tmp_path):
    from deltatune.models import save_model

    return save_model(tiny_model(), tiny_tokenizer(), tmp_path / "good")


def _broken_copies(tmp_path):
    import json
    import shutil

    good = _saved_tiny(tmp_path)

    def copy(name, mutate):
        p = tmp_path / name
        shutil.copytree(good, p)
        mutate(p)
        return p

    config = json.loads((good / "config.json").read_text())
    return {
        "unknown model_type": copy(
            "foo", lambda p: (p / "config.json").write_text(json.dumps({**config, "model_type": "foo"}))
        ),
        "no model_type": copy("empty", lambda p: (p / "config.json").write_text("{}")),
        "cut-short weights": copy(
            "cut", lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:1000])
        ),
        "no tokenizer": copy(
            "notok", lambda p: [(p / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")]
        ),
        "a weights file given": good / "model.safetensors",
    }


def test_a_bad_model_argument_is_a_one_line_error_naming_it(tmp_path):
    import pytest

    from deltatune.errors import UserError
    from deltatune.models import load_model

    for what, path in _broken_copies(tmp_path).items():
        with pytest.raises(UserError) as info:
            load_model(str(path))
        assert str(path) in str(info.value), what
        assert "\n" not in str(info.value).strip(), what


def test_a_gguf_model_loaded_in_bf16_computes_as_the_same_model_loaded_from_a_folder(tmp_path, monkeypatch):
    """transformers' GGUF loader dequantises to float32, so load_model casts afterwards; that cast must not round
    RoPE's inv_freq to bf16 (from_pretrained keeps it float32), or logits drift with position."""
    from transformers import AutoModelForCausalLM

    from deltatune import models

    folder = _saved_tiny(tmp_path)
    real = AutoModelForCausalLM.from_pretrained

    def gguf_like(ref, gguf_file=None, dtype=None, **kw):  # as the GGUF loader: float32 whatever is asked
        return real(ref, dtype=torch.float32, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", gguf_like)
    monkeypatch.setattr(models, "resolve_model", lambda name: (str(folder), {"gguf_file": "m.gguf"}))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: tiny_tokenizer())
    monkeypatch.setattr(models, "gguf_load_kwargs", lambda path: {})  # no file to read (a real one: review3)
    from_gguf, _ = models.load_model("m.gguf", dtype="bf16")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", real)
    from_folder = real(folder, dtype=torch.bfloat16)
    assert from_gguf.model.rotary_emb.inv_freq.dtype == from_folder.model.rotary_emb.inv_freq.dtype
    assert from_gguf.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.arange(500).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(from_gguf(ids).logits, from_folder(ids).logits)


def test_the_demo_refuses_bad_arguments_before_loading_anything(tmp_path, monkeypatch):
    import pytest

    from deltatune import demo, models
    from deltatune.errors import UserError

    def no_load(*a, **k):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(models, "load_model", no_load)
    for kwargs in ({"n_train": 0}, {"n_train": -5}, {"steps": 0}):
        with pytest.raises(UserError):
            demo.run_demo(output=str(tmp_path / "run"), **kwargs)
    mine = tmp_path / "mine"
    (mine / "final").mkdir(parents=True)  # a user's folder, not a run: the training at the end would refuse it
    with pytest.raises(UserError, match="already holds a run"):
        demo.run_demo(output=str(mine))
    with pytest.raises(UserError, match="not a deltatune run"):
        demo.run_demo(output=str(mine), overwrite=True)


def test_the_demo_replaces_only_its_own_run_without_overwrite(tmp_path, monkeypatch):
    """`deltatune demo --output DIR` replaced any deltatune run in DIR (it always trained with overwrite): a user's
    DoRA run there was lost. It now replaces only the run an earlier demo wrote, unless --overwrite."""
    import pytest
    import yaml

    from deltatune import demo, models
    from deltatune.errors import UserError

    class Loaded(Exception):
        pass

    def stop(*a, **k):
        raise Loaded  # the folder check passed; nothing more is needed here

    monkeypatch.setattr(models, "load_model", stop)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": None, "method": "dora", "rank": 8}))
    with pytest.raises(UserError, match="already holds a run the demo did not write .*pass --overwrite"):
        demo.run_demo(output=str(run))
    demo._mark_demo_run(run)  # what a finished demo leaves
    with pytest.raises(Loaded):
        demo.run_demo(output=str(run))
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": None, "method": "lora", "rank": 4})
    )  # a user's run there since
    with pytest.raises(UserError, match="already holds a run"):
        demo.run_demo(output=str(run))
    with pytest.raises(Loaded):
        demo.run_demo(output=str(run), overwrite=True)


def test_the_demo_generates_from_the_prompts_it_trains_on():
    """The demo trained with chatml but generated from `apply_chat_template`, which added SmolLM2's default system
    prompt the training never showed (and raised on a tokenizer without a chat template)."""
    from deltatune import demo
    from deltatune.data.pipeline import prepare_records
    from deltatune.data.segments import Role

    records = demo.make_records(3, seed=0)
    for with_template in (True, False):
        tok = tiny_tokenizer()
        if not with_template:
            tok.chat_template = None
        prompts = demo._prompts(tok, records)
        for prompt, ex in zip(prompts, prepare_records(records, tok, template=demo.TEMPLATE).examples):
            first = ex.roles.index(Role.RESPONSE)
            assert tok(prompt, add_special_tokens=False)["input_ids"] == ex.input_ids[:first]


def test_generation_stops_at_the_models_own_end_of_turn_token():
    """Gemma ends a chat turn with <end_of_turn>, listed only in the model's generation_config.eos_token_id:
    passing the tokenizer's eos alone made every reply run on to max_new_tokens."""
    model, tok = tiny_model(), tiny_tokenizer()
    ids = tok("the cat sat on", add_special_tokens=False)["input_ids"]
    new = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2)
    new = new[0, len(ids) :].tolist()
    end_of_turn = new[1]
    assert end_of_turn != 2
    model.generation_config.eos_token_id = [2, end_of_turn]
    cut = new.index(end_of_turn)
    got = generate(model, tok, ["the cat sat on"], GenerationConfig(max_new_tokens=8), progress=False)
    assert got == [tok.decode(new[:cut], skip_special_tokens=True)]


def test_an_empty_prompt_is_a_clear_error_alone_and_in_a_batch():
    import pytest

    from deltatune.errors import UserError

    model, tok = tiny_model(), tiny_tokenizer()
    for prompts in ([""], ["hello", ""]):
        with pytest.raises(UserError, match="empty"):
            generate(model, tok, prompts, GenerationConfig(max_new_tokens=4), progress=False)


def test_max_new_tokens_that_leave_no_room_for_the_prompt_are_refused():
    """The prompt was cut to max(1, context - max_new_tokens) tokens, so generation ran past the model's
    positions; now a clear error (one token less than the context still generates)."""
    import pytest

    from deltatune.errors import UserError

    model, tok = tiny_model(), tiny_tokenizer()  # 512 positions
    with pytest.raises(UserError, match="max_new_tokens 512 leaves no room"):
        generate(model, tok, ["hello"], GenerationConfig(max_new_tokens=512), progress=False)
    assert len(generate(model, tok, ["hello"], GenerationConfig(max_new_tokens=2), progress=False)) == 1
