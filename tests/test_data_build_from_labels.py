"""`deltatune data from-labels`: exact records, phrasing assignment, errors by file/line/field, atomic output,
and an end-to-end run whose output trains with `deltatune train` on the tiny model."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltatune.cli import main
from deltatune.data.instructions.from_labels import build_from_labels, choose_phrasings, load_task
from deltatune.data.instructions.output import write_jsonl_atomic
from deltatune.errors import ConfigError, DataError

TASK = """\
name: sentiment
templates:
  - "Is the sentiment of this review positive or negative?\\n\\n{text}"
  - "{text}\\n\\nDid the reviewer like the product? Answer with one of: {options}."
  - instruction: "Classify the review as {options}."
    input: "{text}"
labels: {0: negative, 1: positive}
"""
ROWS = [("Great phone, love it", 1), ("Broke after a day", 0), ("Works fine", 1), ("Meh {really}", 0)]
Q0 = "Is the sentiment of this review positive or negative?\n\n"
Q1 = "\n\nDid the reviewer like the product? Answer with one of: negative, positive."


@pytest.fixture
def task(tmp_path):
    p = tmp_path / "task.yaml"
    p.write_text(TASK, encoding="utf-8")
    return p


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "reviews.jsonl"
    p.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS), encoding="utf-8")
    return p


def _strip_meta(records):
    return [{k: v for k, v in r.items() if k != "meta"} for r in records]


def test_round_robin_gives_exact_records(task, data):
    records, report = build_from_labels(data, load_task(task))
    assert _strip_meta(records) == [
        # round-robin within each label (labels 1, 0, 1, 0): each label's i-th example gets phrasing i
        {"instruction": Q0 + "Great phone, love it", "output": "positive"},
        {"instruction": Q0 + "Broke after a day", "output": "negative"},
        {"instruction": "Works fine" + Q1, "output": "positive"},
        {"instruction": "Meh {really}" + Q1, "output": "negative"},  # braces in the data are not re-formatted
    ]
    assert [r["meta"] for r in records][:2] == [
        {"task": "sentiment", "phrasing": 0, "label": "1", "source": f"{data}:1"},
        {"task": "sentiment", "phrasing": 0, "label": "0", "source": f"{data}:2"},
    ]
    assert report.per_phrasing == [2, 2, 0] and report.per_label == {"0": 2, "1": 2}
    assert report.examples == 4 and report.records == 4
    text = report.format(load_task(task))
    assert "4 examples -> 4 records" in text and "  0 (negative): 2" in text and "  1 (positive): 2" in text


def test_k_phrasings_per_example_round_robin_and_seeded(task, data):
    records, report = build_from_labels(data, load_task(task), per_example=2)
    # a label's example i: phrasings 2i, 2i+1 (mod 3); labels 1, 0, 1, 0
    assert [r["meta"]["phrasing"] for r in records] == [0, 1, 0, 1, 2, 0, 2, 0]
    assert [r["meta"]["source"].rsplit(":", 1)[1] for r in records] == ["1", "1", "2", "2", "3", "3", "4", "4"]
    assert report.per_phrasing == [4, 2, 2] and report.per_label == {"0": 4, "1": 4}
    seeded, _ = build_from_labels(data, load_task(task), per_example=2, seed=7)
    rng = random.Random(7)
    expected = [j for _ in ROWS for j in rng.sample(range(3), 2)]
    assert [r["meta"]["phrasing"] for r in seeded] == expected
    for i in range(0, 8, 2):  # K distinct phrasings of the same example
        assert seeded[i]["meta"]["phrasing"] != seeded[i + 1]["meta"]["phrasing"]
    again, _ = build_from_labels(data, load_task(task), per_example=2, seed=7)
    assert again == seeded
    other, _ = build_from_labels(data, load_task(task), per_example=2, seed=8)
    assert [r["meta"]["phrasing"] for r in other] != expected
    with pytest.raises(ConfigError, match="--per-example"):
        build_from_labels(data, load_task(task), per_example=4)


def test_choose_phrasings_round_robin_is_balanced():
    counts = [0] * 5
    for i in range(10):
        for j in choose_phrasings(i, 5, 3, None):
            counts[j] += 1
    assert counts == [6, 6, 6, 6, 6]


def test_csv_and_parquet_give_the_same_records(task, data, tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,label\n" + "".join(f'"{t}",{y}\n' for t, y in ROWS), encoding="utf-8")
    pqt = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"review": [t for t, _ in ROWS], "label": [y for _, y in ROWS]}), pqt)
    want, _ = build_from_labels(data, load_task(task))
    for path in (csv, pqt):
        got, _ = build_from_labels(path, load_task(task), column_map="review=text")
        assert _strip_meta(got) == _strip_meta(want)
    got, _ = build_from_labels(csv, load_task(task), column_map="review=text")
    assert got[0]["meta"]["source"] == f"{csv}:2"  # the header is line 1


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            [{"text": "ok", "label": 1}, {"text": "bad", "label": 2}],
            "{f}:2: field 'label': unknown label '2' (the task knows 0, 1)",
        ),
        ([{"text": "ok", "label": 1}, {"label": 0}], "{f}:2: field 'text': missing column"),
        ([{"text": "ok", "label": 1}, {"text": "  ", "label": 0}], "{f}:2: field 'text': empty text"),
        ([{"text": "ok", "label": 1}, {"text": None, "label": 0}], "{f}:2: field 'text': empty (null)"),
        ([{"text": "ok", "label": 1}, {"text": ["a"], "label": 0}], "{f}:2: field 'text': expected text, got list"),
        ([{"text": "ok"}], "{f}:1: field 'label': missing label"),
        (
            [{"txt": "ok", "label": 1}],
            "{t}: field 'templates[0]': placeholder {{text}} is not a column of {f} (columns: label, txt)",
        ),
    ],
)
def test_every_data_error_names_file_line_and_field(task, tmp_path, lines, message):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    with pytest.raises((DataError, ConfigError)) as exc:
        build_from_labels(f, load_task(task))
    assert str(exc.value) == message.format(f=f, t=task)


def test_csv_empty_cell_and_parquet_row_errors(task, tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nfine,1\n,0\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        build_from_labels(csv, load_task(task))
    assert str(exc.value) == f"{csv}:3: field 'text': empty text"
    pqt = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1, 5]}), pqt)
    with pytest.raises(DataError) as exc:
        build_from_labels(pqt, load_task(task))
    assert str(exc.value) == f"{pqt}: field '[1].label': unknown label '5' (the task knows 0, 1)"


@pytest.mark.parametrize(
    "body, message",
    [
        ("templates: []\nlabels: {0: a}\n", "{t}: field 'templates': expected a non-empty list of phrasings"),
        (
            "templates: ['{text']\nlabels: {0: a}\n",
            "{t}: field 'templates[0]': not a valid template (expected '}}' before end of string); write a literal brace as {{{{ or }}}}",
        ),
        ("templates: ['{0}']\nlabels: {0: a}\n", "{t}: field 'templates[0]': placeholder {{0}} must be a column name"),
        (
            "templates: [{instruction: x, inptu: '{text}'}]\nlabels: {0: a}\n",
            "{t}: field 'templates[0].inptu': a phrasing mapping has an 'instruction' and an optional 'input' part",
        ),
        (
            "templates: [x]\n",
            "{t}: field 'labels': expected a mapping from label to label word, e.g. {{0: negative, 1: positive}}",
        ),
        ("templates: [x]\nlabels: {0: ''}\n", "{t}: field 'labels.0': expected a non-empty label word"),
        (
            "templates: [x]\nlabels: {0: a}\nlabel: 3\n",
            "{t}: field 'label': unknown key (expected name, templates, labels)",
        ),
        ("templates: [x\n", "{t}:2: not valid YAML (expected ',' or ']', but got '<stream end>')"),
    ],
)
def test_task_file_errors(tmp_path, body, message):
    t = tmp_path / "t.yaml"
    t.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_task(t)
    assert str(exc.value) == message.format(t=t)


def test_label_column_as_placeholder_is_refused(tmp_path, data):
    t = tmp_path / "t.yaml"
    t.write_text("templates: ['{text} is {label}']\nlabels: [negative, positive]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"field 'templates\[0\]': placeholder \{label\} is the label column"):
        build_from_labels(data, load_task(t))


def test_an_options_column_and_the_options_placeholder_is_refused(tmp_path, task):
    """A multiple-choice file often has an `options` column; `{options}` silently listed the task's label words
    instead of it. The clash is refused, and the column can be renamed with the column map."""
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"text": "2+2?", "options": "A) 4 B) 5", "label": 1}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"field 'templates\[1\]': placeholder \{options\} lists .* column 'options'"):
        build_from_labels(data, load_task(task))
    records, _ = build_from_labels(data, load_task(task), column_map="options=choices")
    assert records[0]["output"] == "positive"


def _cli(capsys, *argv):
    code = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_summary_refusals_and_no_half_written_output(capsys, task, data, tmp_path):
    out = tmp_path / "out.jsonl"
    code, stdout, _ = _cli(capsys, "from-labels", "--data", data, "--task", task, "--out", out, "--per-example", "3")
    assert code == 0 and len(out.read_text().splitlines()) == 12
    assert "4 examples -> 12 records" in stdout and "[2]       4  Classify the review as {options}. | {text}" in stdout
    before = out.read_bytes()
    code, _, err = _cli(capsys, "from-labels", "--data", data, "--task", task, "--out", out)
    assert code == 2 and err.strip() == f"deltatune data: error: {out}: already exists; pass --overwrite to replace it"
    code, _, err = _cli(capsys, "from-labels", "--data", data, "--task", task, "--out", data, "--overwrite")
    assert code == 2 and "would replace an input file" in err and json.loads(data.read_text().splitlines()[0])
    # an error on the last line: the existing output is untouched and no temporary file is left behind
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "label": 1}) + "\n" + json.dumps({"text": "b", "label": 9}) + "\n")
    code, _, err = _cli(capsys, "from-labels", "--data", bad, "--task", task, "--out", out, "--overwrite")
    assert code == 2 and err.count("\n") == 1 and f"{bad}:2: field 'label'" in err and "Traceback" not in err
    assert out.read_bytes() == before
    code, _, _ = _cli(capsys, "from-labels", "--data", bad, "--task", task, "--out", tmp_path / "new.jsonl")
    assert code == 2 and not (tmp_path / "new.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    code, _, _ = _cli(capsys, "from-labels", "--data", data, "--task", task, "--out", out, "--overwrite")
    assert code == 0 and len(out.read_text().splitlines()) == 4


def test_atomic_writer_keeps_the_old_file_when_writing_fails(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        write_jsonl_atomic(out, [{"a": 1}, circular])
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


def test_from_labels_output_trains_with_deltatune_train(capsys, task, data, tmp_path, tiny_dir):
    out = tmp_path / "train.jsonl"
    assert _cli(capsys, "from-labels", "--data", data, "--task", task, "--out", out, "--per-example", "3")[0] == 0
    clean = tmp_path / "clean.jsonl"  # the worked example of docs/data.md: from-labels -> filter -> train
    assert _cli(capsys, "filter", "--data", out, "--on", "all", "--out", clean)[0] == 0
    assert clean.read_text() == out.read_text()  # 12 distinct records: nothing to drop
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(clean),
            "--output",
            str(run),
            "--method",
            "lora",
            "--rank",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--seq-len",
            "128",
            "--precision",
            "fp32",
            "--set",
            "eval_fraction=0",
            "--quiet",
        ]
    )
    assert code == 0
    assert (run / "final" / "adapter_config.json").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
