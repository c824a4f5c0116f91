import subprocess
import sys
from pathlib import Path

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
