"""Review 9 of building instruction data (`deltatune data ...`). Each test failed before its fix."""

from __future__ import annotations

import json

import pytest

from deltatune.cli import main
from deltatune.data.instructions.filter import FilterOptions, filter_records
from deltatune.data.instructions.self_instruct import CHECKPOINT, PROGRESS, SelfInstructConfig, run_self_instruct
from deltatune.data.instructions.self_instruct_text import CLASSIFY_HEADER, INSTRUCTION_HEADER, Task, read_seed_tasks
from deltatune.errors import DataError, UserError


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _generator(calls: list, stop_after: int | None = None):
    """A model stand-in whose instance outputs hold U+2028 (a line separator that JSON leaves unescaped)."""

    def generate(prompts, *, stop, seed, max_new_tokens=None):
        calls.append(seed)
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        out = []
        for prompt in prompts:
            if prompt.startswith(INSTRUCTION_HEADER):
                out.append(f" Describe weather pattern number {seed} and its {seed % 7} causes in detail")
            elif prompt.startswith(CLASSIFY_HEADER):
                out.append(" No")
            else:
                out.append(f"Input: case {seed}\nOutput: line one\u2028line two\u2029and\x85three")
        return out

    return generate


def test_self_instruct_resumes_after_outputs_holding_unicode_line_separators(tmp_path):
    # str.splitlines() cut progress.jsonl's rounds at U+2028/U+2029/NEL: the run could never be resumed
    seeds = [Task("Give the capital city of the given country", [{"input": "France", "output": "Paris"}], False)]
    config = SelfInstructConfig(n=3, prompts_per_round=1, seed=0)
    straight = run_self_instruct(seeds, _generator([]), config, tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_self_instruct(seeds, _generator([], stop_after=3), config, tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / CHECKPOINT).read_text())["rounds"] == 1
    resumed = run_self_instruct(seeds, _generator([]), config, tmp_path / "b", resume=True, progress=False)
    assert [t.to_json() for t in resumed.tasks] == [t.to_json() for t in straight.tasks]
    assert "\u2028" in resumed.tasks[0].instances[0]["output"]


def test_a_progress_log_shorter_than_its_checkpoint_is_one_line(tmp_path):
    seeds = [Task("Give the capital city of the given country", [{"input": "France", "output": "Paris"}], False)]
    config = SelfInstructConfig(n=3, prompts_per_round=1, seed=0)
    with pytest.raises(KeyboardInterrupt):
        run_self_instruct(seeds, _generator([], stop_after=3), config, tmp_path / "w", progress=False)
    log = tmp_path / "w" / PROGRESS
    log.write_bytes(log.read_bytes()[:10])  # truncate() padded it back with NUL bytes: a JSONDecodeError traceback
    with pytest.raises(UserError, match="shorter than checkpoint.json records"):
        run_self_instruct(seeds, _generator([]), config, tmp_path / "w", resume=True, progress=False)
    log.write_bytes(b"{not json\n" + b" " * 300)
    with pytest.raises(UserError, match=r"progress.jsonl:1: a damaged round"):
        run_self_instruct(seeds, _generator([]), config, tmp_path / "w", resume=True, progress=False)
    log.write_bytes(b" " * 300)  # no whole line where the checkpoint records one round: it restarted from nothing
    with pytest.raises(UserError, match=r"holds 0 whole rounds where checkpoint.json records 1"):
        run_self_instruct(seeds, _generator([]), config, tmp_path / "w", resume=True, progress=False)


@pytest.mark.parametrize("command", ["filter", "mix"])
def test_a_lone_surrogate_in_a_field_nothing_validates_is_one_line(command, tmp_path, capsys):
    # `meta` was copied through unread and failed when written: a UnicodeEncodeError traceback
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"instruction": "hi there", "output": "x"}\n{"instruction": "b", "output": "y", "meta": "\\udc00"}\n'
    )
    out = tmp_path / "out.jsonl"
    args = ["--data", str(data)] if command == "filter" else [f"{data}:1", "--n", "2"]
    assert main(["data", command, *args, "--out", str(out)]) == 2
    assert _one_line(capsys.readouterr().err).endswith(
        f"{data}:2: field 'meta': not valid Unicode: a lone surrogate (half of an escaped UTF-16 pair)"
    )
    assert not out.exists()


def test_a_lone_surrogate_in_a_task_file_or_a_seed_is_one_line(tmp_path, capsys):
    data = tmp_path / "r.jsonl"
    data.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    task = tmp_path / "task.yaml"
    task.write_text('templates: ["Is this positive? {text}"]\nlabels: {0: "no", 1: "ye\\ud800s"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["data", "from-labels", "--data", str(data), "--task", str(task), "--out", str(out)]) == 2
    assert f"{task}: field 'labels.1': not valid Unicode" in _one_line(capsys.readouterr().err)
    assert not out.exists()
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Name \\ud800", "instances": [{"input": "", "output": "x"}]}\n')
    with pytest.raises(DataError, match=r"seeds.jsonl:1: field 'instruction': not valid Unicode"):
        read_seed_tasks(seeds)  # the tokenizer's TypeError after the model loaded, a work folder left behind


def test_self_instruct_out_that_is_its_work_folder_is_refused_before_any_work(tmp_path, capsys):
    # --work equal to --out ran every round, then failed writing --out, naming a temporary file
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Name a colour", "instances": [{"input": "", "output": "red"}]}\n')
    out = tmp_path / "o.jsonl"
    args = ["data", "self-instruct", "--model", str(tmp_path / "no-model"), "--seeds", str(seeds), "--n", "2"]
    assert main([*args, "--out", str(out), "--work", str(out)]) == 2
    assert _one_line(capsys.readouterr().err).endswith(f"{out}: is --work or inside it; choose another --out")
    assert not out.exists()


def test_a_filter_that_drops_every_record_writes_nothing(tmp_path, capsys, tiny_dir):
    # an empty --out and exit 0; train then refused the file ("no records")
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"instruction": "Say hi to me", "output": "hi"}\n{"instruction": "Say bye to me", "output": "x"}\n'
    )
    out = tmp_path / "out.jsonl"
    report = tmp_path / "report.json"
    args = ["data", "filter", "--data", str(data), "--out", str(out), "--max-prompt-tokens", "1", "--model", tiny_dir]
    assert main([str(a) for a in args]) == 2
    assert _one_line(capsys.readouterr().err).endswith(
        f"{data}: every record was dropped (2 prompt_too_long); --out not written"
    )
    assert not out.exists()
    assert main([str(a) for a in [*args, "--report", report]]) == 2  # the report is what says why: written
    assert _one_line(capsys.readouterr().err).endswith(f"--out not written; the report is in {report}")
    assert json.loads(report.read_text())["dropped"] == {"prompt_too_long": 2} and not out.exists()


def test_the_filter_report_names_every_dropped_record(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Say hi", "output": f"hi {i}"}) + "\n" for i in range(30)))
    records, report = filter_records(data, FilterOptions(near="none"))
    assert len(records) == 1 and report.dropped["exact_duplicate"] == 29
    assert [e["source"] for e in report.examples] == [f"{data}:{i}" for i in range(2, 31)]  # only 20 were named
    assert {e["duplicate_of"] for e in report.examples} == {f"{data}:1"}


def test_decimal_labels_agree_however_they_are_written():
    # a CSV's "1.50" did not match the task file's 1.5: an "unknown label" error on every row
    from deltatune.data.instructions.from_labels import _label_key

    assert _label_key("1.50") == _label_key(1.5) == _label_key("1.5") == "1.5"
    assert _label_key("2.0") == _label_key(2) == "2" and _label_key("007") == "007" and _label_key("1.2.3") == "1.2.3"


def test_a_negative_self_instruct_temperature_is_refused_before_the_model_loads(tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Name a colour", "instances": [{"input": "", "output": "red"}]}\n')
    args = ["data", "self-instruct", "--model", str(tmp_path / "no-model"), "--seeds", str(seeds), "--n", "2"]
    assert main([*args, "--out", str(tmp_path / "o.jsonl"), "--temperature", "-1"]) == 2
    assert _one_line(capsys.readouterr().err).endswith("field '--temperature': must be 0 (greedy) or more, got -1.0")


def test_only_what_is_written_is_checked_and_a_bad_key_names_its_object(tmp_path, capsys):
    # review of the fix: from-labels refused a surrogate in a column it never writes, and a bad key was put into the
    # path itself, which the server's error answer could not encode (a 500 where it answered 400)
    from deltatune.data.formats import invalid_unicode_field

    assert invalid_unicode_field({"x\ud800": 1}) == ""
    assert invalid_unicode_field({"messages": [{"role": "user", "c\udc00": "hi"}]}) == "messages.0"
    assert invalid_unicode_field({"stop": ["ok", "\ud800"]}) == "stop.1"
    assert invalid_unicode_field({"a": ["ok", {"b": 1.0}]}) is None
    data = tmp_path / "r.jsonl"
    data.write_text('{"text": "good", "label": 1, "url": "http://x/\\ud83d"}\n{"text": "bad", "label": 0}\n')
    task = tmp_path / "task.yaml"
    task.write_text('templates: ["Is this positive? {text}"]\nlabels: {0: "no", 1: "yes"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["data", "from-labels", "--data", str(data), "--task", str(task), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2 and "\\ud83d" not in out.read_text()
