"""`deltatune preview` and `deltatune stats` end to end on the tiny tokenizer, plus the stats maths."""

import json

import pytest

from deltatune.cli import main
from deltatune.data.masking import LossPolicy, policy_weights
from deltatune.data.pipeline import prepare_dataset
from deltatune.data.segments import Role, TokenizedExample
from deltatune.data.stats import advise, dataset_stats, distribution

ALPACA = {"instruction": "What is 2 + 3?", "input": "ABC", "output": "The answer is 5."}
CHAT = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "What?"},
        {"role": "assistant", "content": "5"},
    ]
}


@pytest.fixture
def files(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps(ALPACA) + "\n" + json.dumps({**ALPACA, "input": ""}) + "\n", encoding="utf-8")
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps(CHAT) + "\n", encoding="utf-8")
    return a, c


def _run(capsys, *argv):
    code = main(list(argv) + ["--tokenizer", "tiny"])
    out, err = capsys.readouterr()
    return code, out, err


def test_preview_json_matches_the_policy_token_by_token(capsys, files, tiny_tok):
    code, out, _ = _run(
        capsys, "preview", "--data", str(files[0]), "--template", "chatml", "--policy", "response", "--format", "json"
    )
    assert code == 0
    got = json.loads(out)
    assert len(got) == 2 and set(got[0][0]) == {"token", "id", "segment", "weight"}
    ex = prepare_dataset(files[0], tiny_tok, template="chatml").examples[0]
    assert [t["id"] for t in got[0]] == ex.input_ids
    assert [t["segment"] for t in got[0]] == [r.value for r in ex.roles]
    assert [i for i, t in enumerate(got[0]) if t["weight"] > 0] == list(range(20, 27))  # as in test_data_masking
    assert "".join(t["token"] for t in got[0]).startswith("<|im_start|>user\nWhat is 2 + 3?\n\nABC<|im_end|>")


def test_preview_text_plain_when_piped_coloured_on_request(capsys, files):
    code, out, _ = _run(
        capsys, "preview", "--data", str(files[1]), "--template", "chatml", "--policy", "weighted:0.5,turns=last"
    )
    assert code == 0 and "\x1b[" not in out
    lines = out.splitlines()
    assert any('response    w=0.5   "Hello there.<|im_end|>"' in line for line in lines)  # earlier turn: context
    assert any('response    w=1     "5<|im_end|>"' in line for line in lines)
    code, out, _ = _run(capsys, "preview", "--data", str(files[1]), "--policy", "response", "--color", "always")
    assert code == 0 and "\x1b[1;31m" in out  # bold red: a loss-bearing response token
    code, out, _ = _run(
        capsys, "preview", "--data", str(files[0]), "--policy", "instruction->response@10", "--limit", "1"
    )
    assert code == 0 and "first phase" in out and out.count("== example") == 1


def test_cli_bad_input_is_one_line_and_exit_2(capsys, tmp_path, files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ALPACA) + "\n" + '{"instruction": "x", "output": 5}\n', encoding="utf-8")
    for cmd in ("preview", "stats"):
        code, out, err = _run(capsys, cmd, "--data", str(bad))
        assert code == 2
        assert err.strip() == f"deltatune {cmd}: error: {bad}:2: field 'output': expected a string, got int"
    code, _, err = _run(capsys, "preview", "--data", str(files[0]), "--policy", "weighted:7")
    assert code == 2 and "--policy" in err and "Traceback" not in err
    code, out, err = _run(capsys, "stats", "--data", str(bad), "--skip-bad", "--format", "json")
    assert code == 0 and json.loads(out)["report"]["skipped_bad"] == 1


def test_stats_json_numbers_agree_with_the_examples(capsys, shared_data, tmp_path, tiny_tok):
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:50]
    g = tmp_path / "g.jsonl"
    g.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, _ = _run(
        capsys,
        "stats",
        "--data",
        str(g),
        "--map",
        "question=instruction,answer=output",
        "--template",
        "alpaca",
        "--max-len",
        "200",
        "--format",
        "json",
    )
    assert code == 0
    s = json.loads(out)
    exs = prepare_dataset(
        g, tiny_tok, template="alpaca", column_map={"question": "instruction", "answer": "output"}, max_len=10**6
    ).examples
    instr = [sum(r == Role.INSTRUCTION for r in ex.roles) for ex in exs]
    resp = [sum(r == Role.RESPONSE for r in ex.roles) for ex in exs]
    assert s["examples"] == 50
    assert s["ratio_instruction_to_response"] == pytest.approx(sum(instr) / sum(resp))
    assert s["tokens"]["response"]["max"] == max(resp)
    assert s["would_truncate"] == sum(len(ex) > 200 for ex in exs) > 0
    im = LossPolicy("instruction")
    # over the examples training keeps (cut at --max-len), with each first token at 0 as training weighs it
    kept = prepare_dataset(
        g, tiny_tok, template="alpaca", column_map={"question": "instruction", "answer": "output"}, max_len=200
    ).examples
    assert s["policies"]["instruction"]["loss_weight_per_example"] == pytest.approx(
        sum(sum(policy_weights(ex, im)[1:]) for ex in kept) / len(kept)
    )
    assert any("Alpaca 5k" in a or "Dolly" in a for a in s["advice"])
    code, text, _ = _run(capsys, "stats", "--data", str(g), "--map", "question=instruction,answer=output")
    assert code == 0 and "advice:" in text and "padding waste" in text


def test_distribution_and_padding_numbers():
    d = distribution([5, 1, 3, 2, 4, 6, 7, 8, 9, 10])
    assert (d["min"], d["median"], d["p90"], d["max"]) == (1, 5.5, 9, 10)
    mk = lambda n_i, n_r: TokenizedExample(
        [3] * (n_i + n_r + 2),
        [Role.ROLE] * 2
        + [Role.INSTRUCTION] * n_i  # noqa: E731
        + [Role.RESPONSE] * n_r,
        [0] * (n_i + n_r + 2),
    )
    examples = [mk(10, 2), mk(30, 8), mk(20, 15)]
    s = dataset_stats(examples, max_len=30, seq_len=64, batch_size=2)
    assert s["ratio_instruction_to_response"] == pytest.approx(60 / 25)
    # 2+30 > 30 with the response starting at 32: lost whole; 2+20+15 = 37 is cut to 30 and keeps 8 response tokens
    assert s["would_truncate"] == 2 and s["would_lose_whole_response"] == 1
    # padding counts what training keeps: the first (14 tokens) and the third cut to 30, not the dropped second
    assert s["examples_trained"] == 2
    assert s["padding"]["packed_waste"] == pytest.approx(1 - (14 + 30) / 64)
    assert s["padding"]["padded_waste"] == pytest.approx(1 - (14 + 30) / 60)
    drop = dataset_stats(examples, max_len=30, seq_len=64, batch_size=2, overflow="drop")
    assert drop["examples_trained"] == 1  # --overflow drop keeps only the example that fits
    assert drop["padding"]["packed_waste"] == pytest.approx(1 - 14 / 64) and drop["padding"]["padded_waste"] == 0


def test_advice_follows_the_paper_in_numbers():
    base = {
        "tokens": {"instruction": {"mean": 0.0}, "response": {"mean": 0.0}},
        "would_truncate": 0,
        "max_len": 1,
        "policies": {"instruction": {"boilerplate_share": 0.0}},
        "padding": {},
        "batch_size": 8,
    }
    high = advise({**base, "ratio_instruction_to_response": 20.0, "examples": 2000}, "chatml")
    assert "MMLU-Chat" in high[0] and "4.42 -> 9.78" in high[0] and "--policy instruction" in high[1]
    assert "small dataset" in high[2]
    low = advise({**base, "ratio_instruction_to_response": 0.08, "examples": 50_000}, "chatml")
    assert "LIMA" in low[0] and "--policy response" in low[1] and "35K" in low[2]
