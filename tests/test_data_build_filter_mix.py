"""`deltatune data filter` and `mix`: which hand-made duplicates go and which survive, with true similarities;
token limits; mixture counts, seeds and repetition; refusals and atomic outputs."""

import json
from collections import Counter

import pytest
from rouge_score import rouge_scorer

from deltatune.cli import main
from deltatune.data.instructions.filter import FilterOptions, filter_records
from deltatune.data.instructions.mix import MixSource, mix, mixture_counts, parse_sources
from deltatune.data.instructions.similarity import jaccard, shingles
from deltatune.errors import ConfigError

SEA = "Write a short poem about the sea at night, with the moon, the stars and a small boat far from the coast."
RECORDS = [
    {"instruction": SEA, "output": "Waves."},  # 1 kept
    {
        "instruction": "  write a SHORT poem about the sea at night, with the moon, the stars and a small boat "
        "far from the coast.",
        "output": "Other waves.",
    },  # 2 exact (prompt)
    {"instruction": SEA.replace("small boat", "little boat"), "output": "Boats."},  # 3 near
    {"instruction": "List three prime numbers greater than ten.", "output": "11, 13, 17."},  # 4 kept
    {"instruction": "Translate 'good morning' into French.", "output": "Bonjour."},  # 5 kept
    {"instruction": "List three prime numbers greater than twenty.", "output": "23, 29, 31."},  # 6 rouge-near of 4
]


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return p


def test_minhash_drops_exact_and_near_duplicates_keeps_the_first(data):
    kept, report = filter_records(data, FilterOptions(near="minhash", threshold=0.7))
    assert kept == [RECORDS[0], RECORDS[3], RECORDS[4], RECORDS[5]]  # 6 vs 4: Jaccard 4/6 < 0.7
    assert report.dropped == Counter(exact_duplicate=1, near_duplicate=1) and (report.read, report.kept) == (6, 4)
    near = report.examples[1]
    assert near["source"] == f"{data}:3" and near["duplicate_of"] == f"{data}:1"
    assert near["similarity"] == jaccard(shingles(RECORDS[2]["instruction"]), shingles(SEA))  # the exact Jaccard
    assert near["similarity"] == 17 / 23  # one word changed: 3 of 20 shingles differ
    assert report.examples[0] == {
        "source": f"{data}:2",
        "reason": "exact_duplicate",
        "duplicate_of": f"{data}:1",
        "similarity": 1.0,
    }
    # above the pair's similarity the near duplicate survives
    kept, _ = filter_records(data, FilterOptions(near="minhash", threshold=0.9))
    assert kept == [RECORDS[0], RECORDS[2], RECORDS[3], RECORDS[4], RECORDS[5]]


def test_rouge_near_duplicates_and_the_whole_record_key(data):
    kept, report = filter_records(data, FilterOptions(near="rouge", threshold=0.7))
    assert kept == [RECORDS[0], RECORDS[3], RECORDS[4]]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    sims = {e["source"]: e["similarity"] for e in report.examples if e["reason"] == "near_duplicate"}
    assert sims == {
        f"{data}:3": scorer.score(SEA, RECORDS[2]["instruction"])["rougeL"].fmeasure,
        f"{data}:6": scorer.score(RECORDS[3]["instruction"], RECORDS[5]["instruction"])["rougeL"].fmeasure,
    }
    # on the whole record, record 2 (same prompt, other answer) is no longer an exact duplicate
    kept, report = filter_records(data, FilterOptions(near="none", on="all"))
    assert kept == RECORDS and report.kept == 6


def test_token_length_limits(data, tiny_tok):
    lens = [len(tiny_tok(r["output"], add_special_tokens=False)["input_ids"]) for r in RECORDS]
    opts = FilterOptions(near="none", on="all", min_response_tokens=min(lens) + 1, max_response_tokens=max(lens) - 1)
    kept, report = filter_records(data, opts, tokenizer=tiny_tok)
    assert kept == [r for r, n in zip(RECORDS, lens) if min(lens) < n < max(lens)]
    assert report.dropped["response_too_short"] == lens.count(min(lens))
    assert report.dropped["response_too_long"] == lens.count(max(lens))
    with pytest.raises(ConfigError, match="tokenizer"):
        filter_records(data, opts)


def test_filter_cli_writes_records_and_report_and_refuses_overwrite(capsys, data, tmp_path):
    out, rep = tmp_path / "f.jsonl", tmp_path / "r.json"
    code = main(
        [
            "data",
            "filter",
            "--data",
            str(data),
            "--out",
            str(out),
            "--threshold",
            "0.7",
            "--report",
            str(rep),
            "--tokenizer",
            "tiny",
            "--max-prompt-tokens",
            "1000",
        ]
    )
    stdout, _ = capsys.readouterr()
    assert code == 0 and [json.loads(x) for x in out.read_text().splitlines()] == [RECORDS[i] for i in (0, 3, 4, 5)]
    assert json.loads(rep.read_text())["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert stdout.startswith("read 6, kept 4, dropped 2\n")
    code = main(["data", "filter", "--data", str(data), "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_filter_bad_record_is_one_line_and_writes_nothing(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"instruction": "x", "output": ""}) + "\n")
    code = main(["data", "filter", "--data", str(bad), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"deltatune data: error: {bad}:2: field 'output': empty\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.fixture
def sources(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"instruction": f"a{i}", "output": "x"}) + "\n" for i in range(20)))
    b.write_text("".join(json.dumps({"instruction": f"b{i}", "output": "y"}) + "\n" for i in range(2)))
    return a, b


def test_mixture_counts_sum_to_n():
    assert mixture_counts([0.7, 0.3], 10) == [7, 3]
    assert mixture_counts([1, 1, 1], 10) == [4, 3, 3]
    assert mixture_counts([2, 1], 7) == [5, 2]  # 4.67, 2.33
    assert sum(mixture_counts([0.2, 0.3, 0.5], 101)) == 101


def test_mix_proportions_seed_and_repetition(sources):
    a, b = sources
    got, parts = mix([MixSource(str(a), 0.7), MixSource(str(b), 0.3)], 10, seed=1)
    names = Counter(r["instruction"][0] for r in got)
    assert names == {"a": 7, "b": 3}
    assert len({r["instruction"] for r in got if r["instruction"][0] == "a"}) == 7  # without replacement
    assert {r["instruction"] for r in got if r["instruction"][0] == "b"} == {"b0", "b1"}  # b repeated whole, then drawn
    assert [p.taken for p in parts] == [7, 3] and parts[1].repeated and not parts[0].repeated
    again, _ = mix([MixSource(str(a), 0.7), MixSource(str(b), 0.3)], 10, seed=1)
    other, _ = mix([MixSource(str(a), 0.7), MixSource(str(b), 0.3)], 10, seed=2)
    assert again == got and other != got


def test_mix_of_formats_becomes_chat_and_trains_as_one_file(tmp_path, sources, tiny_tok):
    from deltatune.data.pipeline import prepare_dataset

    a, _ = sources
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    got, _ = mix([MixSource(str(a), 1), MixSource(str(c), 1)], 4, seed=0)
    assert all(set(r) == {"messages"} for r in got)
    out = tmp_path / "m.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in got))
    assert prepare_dataset(out, tiny_tok).report.kept == 4


def test_mix_cli_and_bad_specs(capsys, sources, tmp_path):
    a, b = sources
    out = tmp_path / "m.jsonl"
    assert main(["data", "mix", f"{a}:0.7", f"{b}:0.3", "--n", "10", "--seed", "3", "--out", str(out)]) == 0
    assert "repeated: only 2 available" in capsys.readouterr().out and len(out.read_text().splitlines()) == 10
    for spec in (f"{a}", f"{a}:0", f"{a}:x"):
        with pytest.raises(ConfigError, match="FILE:WEIGHT"):
            parse_sources([spec])
    assert main(["data", "mix", f"{a}:1", "--n", "3", "--out", str(a), "--overwrite"]) == 2
    assert "would replace an input" in capsys.readouterr().err


@pytest.mark.parametrize(
    "limits, message",
    [
        (["--max-response-tokens", "0"], "field '--max-response-tokens': must be 1 or more, got 0"),
        (["--min-response-tokens", "-1"], "field '--min-response-tokens': must be 0 or more, got -1"),
        (["--max-prompt-tokens", "-5"], "field '--max-prompt-tokens': must be 1 or more, got -5"),
        (["--min-response-tokens", "9", "--max-response-tokens", "3"], "9 is above --max-response-tokens 3"),
    ],
)
def test_filter_length_limits_that_keep_nothing_are_one_line(capsys, tmp_path, limits, message):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    code = main(
        ["data", "filter", "--data", str(data), "--tokenizer", "tiny", "--out", str(tmp_path / "o.jsonl"), *limits]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
