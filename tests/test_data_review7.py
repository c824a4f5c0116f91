"""Review 7 of instruction-data construction: near duplicates found at any threshold, label words YAML reads as
booleans, phrasings independent of labels, a file mixed twice, resume of a missing run, --out over --work."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from deltatune.cli import main
from deltatune.data.instructions.from_labels import build_from_labels, load_task
from deltatune.data.instructions.mix import MixSource, mix
from deltatune.data.instructions.self_instruct import SelfInstructConfig, run_self_instruct
from deltatune.data.instructions.similarity import NearDuplicateIndex, jaccard, shingles
from deltatune.errors import ConfigError, UserError


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_every_pair_at_or_above_the_threshold_is_found(threshold):
    # the LSH built at the decision threshold missed up to a third of the pairs just above it (the exact check can
    # only reject candidates), and had no bands for 0.99 and 1.0 (a ValueError traceback)
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    found = 0
    for _ in range(150):
        base = rng.sample(vocab, 60)
        for k in range(60, -1, -1):  # the most words replaced that keep the pair at or above the threshold
            variant = base[: 60 - k] + rng.sample(vocab, k)
            if jaccard(shingles(" ".join(base)), shingles(" ".join(variant))) >= threshold:
                break
        index = NearDuplicateIndex(threshold)
        index.add(0, " ".join(base))
        found += index.match(" ".join(variant)) is not None
    assert found == 150


def _task(tmp_path, labels: str):
    path = tmp_path / "task.yaml"
    path.write_text(f"name: t\ntemplates:\n  - 'A: {{text}}'\n  - 'B: {{text}}'\nlabels: {labels}\n")
    return path


def test_a_label_word_yaml_reads_as_a_boolean_is_refused(tmp_path):
    # {0: no, 1: yes} made every output "False" or "True", with no error
    with pytest.raises(ConfigError, match="labels.0.*booleans; quote it"):
        load_task(_task(tmp_path, "{0: no, 1: yes}"))
    assert load_task(_task(tmp_path, "{0: 'no', 1: 'yes'}")).labels == {"0": "no", "1": "yes"}


def test_the_phrasing_tells_nothing_of_the_label_where_labels_alternate(tmp_path):
    # round-robin over all examples gave each label one phrasing when labels alternate in the file
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(100)))
    records, report = build_from_labels(data, load_task(_task(tmp_path, "[negative, positive]")))
    pairs = Counter((r["meta"]["phrasing"], r["output"]) for r in records)
    assert pairs == {(0, "negative"): 25, (1, "negative"): 25, (0, "positive"): 25, (1, "positive"): 25}
    assert report.per_phrasing == [50, 50]


def test_one_file_mixed_twice_is_refused(tmp_path):
    # it drew some records twice while the summary spoke of drawing without replacement
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(10)))
    with pytest.raises(ConfigError, match="same file as"):
        mix([MixSource(str(a), 0.5), MixSource(str(tmp_path / "." / "a.jsonl"), 0.5)], 10)


def test_resuming_a_run_that_is_not_there_is_refused(tmp_path):
    # a mistyped --work with --resume quietly started a fresh run beside the real one
    def generate(prompts, max_new_tokens):  # never called
        raise AssertionError

    seeds = []
    with pytest.raises(UserError, match="holds no run, nothing to resume"):
        run_self_instruct(seeds, generate, SelfInstructConfig(n=1), tmp_path / "typo", resume=True, progress=False)
    assert not (tmp_path / "typo").exists()


def test_self_instruct_out_over_a_file_of_its_work_folder_is_refused(tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("")
    args = ["data", "self-instruct", "--seeds", str(seeds), "--n", "4", "--work", str(tmp_path / "w")]
    assert main([*args, "--out", str(tmp_path / "w" / "progress.jsonl")]) == 2
    assert "the run's own progress.jsonl" in capsys.readouterr().err
