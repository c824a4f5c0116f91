"""Self-Instruct's mechanics with a scripted generator (a tiny model writes gibberish): prompts built from the
seed tasks, the paper's filters with their reasons, ROUGE-L diversity, classification -> output-first instances,
and resume after an interruption (or a SIGKILL of the CLI on the tiny model) equal to an uninterrupted run."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from deltatune.data.instructions.self_instruct import (
    CHECKPOINT,
    PROGRESS,
    SelfInstructConfig,
    run_self_instruct,
    write_outputs,
)
from deltatune.data.instructions.self_instruct_text import (
    CLASSIFY_HEADER,
    INPUT_FIRST_HEADER,
    INSTRUCTION_HEADER,
    OUTPUT_FIRST_HEADER,
    parse_instances,
    read_seed_tasks,
)
from deltatune.errors import DataError, UserError
from deltatune.evaluate.generate import Generation

REPO = Path(__file__).resolve().parent.parent
SEEDS = [
    ("Suggest a name for a new bakery in a small mountain town.", False, "", "Summit Crumbs."),
    ("Explain why the sky looks blue during the day.", False, "", "Rayleigh scattering."),
    (
        "Summarize the following paragraph in one sentence.",
        False,
        "Cats sleep a lot. They nap often.",
        "Cats sleep much.",
    ),
    ("Convert the temperature from Celsius to Fahrenheit.", False, "20 C", "68 F"),
    ("Give a synonym for the following word.", False, "happy", "glad"),
    ("Classify the sentiment of the tweet as positive or negative.", True, "I love rain", "positive"),
    ("Is the following number odd or even?", True, "7", "odd"),
    ("Decide whether the statement is a fact or an opinion.", True, "Paris is in France.", "fact"),
    ("Tell whether the animal is a mammal, bird or fish.", True, "salmon", "fish"),
    ("Detect the language of the sentence: English, French or German.", True, "Guten Tag", "German"),
]
WORDS = (
    "ocean forest lantern copper violin harbor meadow canyon glacier orchard pepper saddle "
    "thunder marble falcon ribbon cactus anchor velvet quartz"
).split()


@pytest.fixture
def seeds_file(tmp_path):
    p = tmp_path / "seeds.jsonl"
    p.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"seed_task_{i}",
                    "name": f"t{i}",
                    "instruction": ins,
                    "instances": [{"input": inp, "output": out}],
                    "is_classification": clf,
                }
            )
            + "\n"
            for i, (ins, clf, inp, out) in enumerate(SEEDS)
        ),
        encoding="utf-8",
    )
    return p


class Scripted:
    """Deterministic stand-in for a model: a function of (prompt, seed); records every call."""

    def __init__(self, fail_on_call: int | None = None, instructions: str | None = None, instance=None):
        self.calls: list[tuple[list[str], tuple, int]] = []
        self.fail_on_call = fail_on_call
        self.instructions = instructions
        self.instance = instance

    def __call__(self, prompts, *, stop, seed, max_new_tokens=None):
        self.calls.append((list(prompts), stop, seed, max_new_tokens))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt  # as if the process were stopped here
        return [self.reply(p, seed) for p in prompts]

    def reply(self, prompt: str, seed: int) -> str:
        h = hashlib.sha256(f"{seed}|{prompt}".encode()).digest()
        last = prompt.rsplit("Task: ", 1)[-1].split("\n", 1)[0]
        if prompt.startswith(INSTRUCTION_HEADER):
            if self.instructions is not None:
                return self.instructions
            new = [
                f"Describe the {WORDS[h[i] % 20]} and the {WORDS[h[i + 1] % 20]} near the {WORDS[h[i + 2] % 20]}"
                for i in (0, 3)
            ]
            return f" {new[0]}\n10. {new[1]}\n11. Draw a map of the town\n\nignored after the stop"
        if prompt.startswith(CLASSIFY_HEADER):
            return " Yes\nTask: x" if h[0] % 3 == 0 else " No"
        if self.instance is not None:
            return self.instance(last)
        if prompt.startswith(OUTPUT_FIRST_HEADER):
            return " yes\nInput: a first case\nClass label: no\nInput: a second case\nTask: next"
        return "Input: some input\nOutput: " + ("" if h[1] % 4 == 0 else f"answer {h[2]}")


def test_seed_file_reads_the_real_format_and_names_bad_lines(shared_data, tmp_path):
    real = read_seed_tasks(shared_data / "self-instruct" / "seed_tasks.jsonl")
    assert len(real) == 175 and 0 < sum(t.is_classification for t in real) < 175
    bad = tmp_path / "s.jsonl"
    bad.write_text(
        json.dumps({"instruction": "ok", "instances": [{"input": "", "output": "x"}]})
        + "\n"
        + json.dumps({"instruction": "ok", "instances": [{"input": ""}]})
        + "\n"
    )
    with pytest.raises(DataError) as exc:
        read_seed_tasks(bad)
    assert str(exc.value) == f"{bad}:2: field 'instances[0]': expected {{input: text, output: text}}"


def test_prompts_are_built_from_seed_and_generated_tasks(seeds_file, tmp_path):
    seeds = read_seed_tasks(seeds_file)
    gen = Scripted()
    result = run_self_instruct(seeds, gen, SelfInstructConfig(n=6, prompts_per_round=2), tmp_path / "w", progress=False)
    seed_ins = {t.instruction for t in seeds}
    first = gen.calls[0][0]
    assert len(first) == 2 and gen.calls[0][1] == ("\n\n",) and gen.calls[1][3] == 4  # "Yes"/"No": few tokens
    for p in first:
        lines = p.split("\n")
        assert lines[0] == INSTRUCTION_HEADER.strip() and lines[-1] == "9."
        shown = [line.split(". ", 1)[1] for line in lines[1:-1]]
        assert [line.split(".", 1)[0] for line in lines[1:-1]] == [str(i) for i in range(1, 9)]
        assert len(set(shown)) == 8 and set(shown) <= seed_ins  # round 1: seed tasks only
    # the next round's instruction prompts show 2 generated tasks and 6 seed tasks
    second = next(c for c in gen.calls[1:] if c[0][0].startswith(INSTRUCTION_HEADER))[0]
    kept_before = {
        t["instruction"] for t in json.loads((tmp_path / "w" / PROGRESS).read_text().splitlines()[0])["kept"]
    }
    for p in second:
        shown = [line.split(". ", 1)[1] for line in p.split("\n")[1:-1]]
        assert sum(s in seed_ins for s in shown) == 6 and sum(s in kept_before for s in shown) == 2
    # the classification question: seed tasks with their own labels as shots, the candidate last
    clf_prompt = gen.calls[1][0][0]
    for t in seeds:
        if f"Task: {t.instruction}\n" in clf_prompt:
            assert (
                f"Task: {t.instruction}\nIs it classification? {'Yes' if t.is_classification else 'No'}" in clf_prompt
            )
    assert clf_prompt.endswith("\nIs it classification?") and clf_prompt.count("Task: ") == 11
    # instances: output-first (class label, then input) for classification tasks, input-first otherwise
    by_ins = {t.instruction: t for t in result.tasks}
    for prompt in gen.calls[2][0]:
        task = by_ins.get(prompt.rsplit("Task: ", 1)[1].split("\n")[0])
        if task is None:
            continue  # dropped (no valid instance)
        if task.is_classification:
            assert prompt.startswith(OUTPUT_FIRST_HEADER) and prompt.endswith("\nClass label:")
            assert task.instances == [
                {"input": "a first case", "output": "yes"},
                {"input": "a second case", "output": "no"},
            ]
            assert all(f"Task: {s[0]}" not in prompt for s in SEEDS if not s[1])  # shots of the same kind
        else:
            assert prompt.startswith(INPUT_FIRST_HEADER) and task.instances[0]["input"] == "some input"
    assert len(result.tasks) == 6 and result.complete
    assert result.dropped["unanswerable"] >= 1 and result.examples["unanswerable"][0] == "Draw a map of the town"


def test_kept_instructions_are_rouge_l_diverse(seeds_file, tmp_path):
    seeds = read_seed_tasks(seeds_file)
    result = run_self_instruct(
        seeds, Scripted(), SelfInstructConfig(n=12, prompts_per_round=3), tmp_path / "w", progress=False
    )
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    everything = [t.instruction for t in seeds] + [t.instruction for t in result.tasks]
    for i, a in enumerate(everything):
        for b in everything[:i]:
            assert scorer.score(b, a)["rougeL"].fmeasure < 0.7
    assert result.dropped["similar"] > 0  # the scripted model repeats itself: that is what was filtered
    assert len(result.records()) == sum(len(t.instances) for t in result.tasks)


def test_every_drop_reason(seeds_file, tmp_path):
    long = " ".join(["word"] * 151)
    listing = (
        " Describe the history of the river Nile in three sentences.\n10. \n11. Hi there\n12. "
        + long
        + "\n13. Describe the image below in detail please.\n14. Write a program that sorts a list of numbers."
        + "\n15. - list the planets of the solar system in order\n16. Écrivez un poème sur la mer et le ciel."
        + "\n17. Describe the history of the river Nile in four sentences."
        + "\n18. Give a synonym for the following word, please."
        + "\n19. Give three tips for staying healthy in winter."
    )

    def instance(task):
        return "Input: \nOutput: " if "Nile" in task else "Output: Drink water."

    gen = Scripted(instructions=listing, instance=instance)
    result = run_self_instruct(
        read_seed_tasks(seeds_file), gen, SelfInstructConfig(n=1, prompts_per_round=1), tmp_path / "w", progress=False
    )
    assert result.dropped == Counter(
        empty=1,
        too_short=1,
        too_long=1,
        unanswerable=1,
        write_a_program=1,
        starts_with_punctuation=1,
        not_english=1,
        similar=2,
        no_valid_instance=1,
    )
    assert result.examples["similar"] == [
        "Describe the history of the river Nile in four sentences.",
        "Give a synonym for the following word, please.",
    ]  # vs this round, vs a seed
    assert [t.instruction for t in result.tasks] == ["Give three tips for staying healthy in winter."]
    assert result.records() == [
        {"instruction": "Give three tips for staying healthy in winter.", "input": "", "output": "Drink water."}
    ]
    report = result.report()
    assert report["kept"] == 1 and report["dropped"]["no_valid_instance"] == 1


def test_generations_cut_at_the_token_limit_are_dropped(seeds_file, tmp_path):
    """The paper's finish_reason == "length" filter: a cut instance list drops its task, and a cut instruction
    list loses its last (possibly half-written) instruction; a cut yes/no answer is normal and kept."""
    listing = " Give three tips for staying healthy in winter.\n10. Name the largest planet of the solar system and"
    scripted = Scripted(instructions=listing, instance=lambda task: "Output: Drink water.")

    def generator(cut: tuple[str, ...]):
        def generate(prompts, *, stop, seed, max_new_tokens=None):
            replies = scripted(prompts, stop=stop, seed=seed, max_new_tokens=max_new_tokens)
            return [Generation(r, hit_limit=p.startswith(cut)) for p, r in zip(prompts, replies)]

        return generate

    seeds = read_seed_tasks(seeds_file)
    config = SelfInstructConfig(n=2, prompts_per_round=1, max_rounds=1)
    cut_list = run_self_instruct(
        seeds, generator((INSTRUCTION_HEADER, CLASSIFY_HEADER)), config, tmp_path / "a", progress=False
    )
    assert cut_list.dropped == Counter(cut_at_limit=1)
    assert cut_list.examples["cut_at_limit"] == ["Name the largest planet of the solar system and"]
    assert [t.instruction for t in cut_list.tasks] == ["Give three tips for staying healthy in winter."]

    cut_instances = run_self_instruct(
        seeds, generator((INPUT_FIRST_HEADER, OUTPUT_FIRST_HEADER)), config, tmp_path / "b", progress=False
    )
    assert cut_instances.tasks == [] and cut_instances.dropped == Counter(cut_at_limit=2)


def test_generate_detailed_flags_a_continuation_that_ran_to_the_limit():
    from deltatune.evaluate.generate import GenerationConfig, generate_detailed, stop_token_ids
    from deltatune.testing import tiny_model, tiny_tokenizer

    model, tok = tiny_model().eval(), tiny_tokenizer()
    [free] = generate_detailed(model, tok, ["hello there"], GenerationConfig(max_new_tokens=6), progress=False)
    ids = tok("hello there", return_tensors="pt", add_special_tokens=False).input_ids
    eos = stop_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    new = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=pad)[0, ids.shape[1] :]
    assert free.hit_limit == (len(new) == 6 and not set(new.tolist()) & set(eos))  # HF's own decoding as the oracle
    assert free.text
    [stopped] = generate_detailed(
        model, tok, ["hello there"], GenerationConfig(max_new_tokens=6, stop=(free.text[0],)), progress=False
    )
    assert stopped.text == "" and not stopped.hit_limit  # its stop string ended it


def test_parse_instances_both_orders():
    assert parse_instances("Input: 2 + 2\nOutput: 4\nInput: 3 + 3\nOutput: 6", False) == [
        {"input": "2 + 2", "output": "4"},
        {"input": "3 + 3", "output": "6"},
    ]
    assert parse_instances("Output: just this", False) == [{"input": "", "output": "just this"}]
    assert parse_instances(" odd\nInput: 7\nClass label: even\nInput: 8", True) == [
        {"input": "7", "output": "odd"},
        {"input": "8", "output": "even"},
    ]
    assert parse_instances("gibberish without markers", False) == []


def test_interrupted_then_resumed_equals_uninterrupted(seeds_file, tmp_path):
    seeds = read_seed_tasks(seeds_file)
    config = SelfInstructConfig(n=8, prompts_per_round=2, seed=5)
    straight_gen = Scripted()
    straight = run_self_instruct(seeds, straight_gen, config, tmp_path / "a", progress=False)
    write_outputs(straight, tmp_path / "a.jsonl", tmp_path / "a")
    assert straight.rounds >= 3
    with pytest.raises(KeyboardInterrupt):  # stopped in the middle of the third round
        run_self_instruct(seeds, Scripted(fail_on_call=8), config, tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / CHECKPOINT).read_text())["rounds"] == 2
    with (tmp_path / "b" / PROGRESS).open("a") as fh:
        fh.write('{"round": 2, "kept": [{"instr')  # a line torn by a kill during the append
    with pytest.raises(UserError, match="pass --resume"):
        run_self_instruct(seeds, Scripted(), config, tmp_path / "b", progress=False)
    with pytest.raises(UserError, match=r"other settings \(config\)"):
        run_self_instruct(
            seeds,
            Scripted(),
            SelfInstructConfig(n=9, prompts_per_round=2, seed=5),
            tmp_path / "b",
            resume=True,
            progress=False,
        )
    resumed_gen = Scripted()
    resumed = run_self_instruct(seeds, resumed_gen, config, tmp_path / "b", resume=True, progress=False)
    write_outputs(resumed, tmp_path / "b.jsonl", tmp_path / "b")
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert resumed.report() == straight.report()
    assert resumed_gen.calls == straight_gen.calls[6:]  # it redid only the unfinished rounds (3 calls a round)
    assert (tmp_path / "b" / "tasks.jsonl").read_bytes() == (tmp_path / "a" / "tasks.jsonl").read_bytes()


def _launch(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "deltatune", "data", "self-instruct", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def one_thread():
    """The killed run is a one-thread subprocess; in-process runs match it thread for thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cli_on_the_tiny_model_sigkill_then_resume_equals_uninterrupted(
    seeds_file, tiny_dir, tmp_path, capsys, one_thread
):
    from deltatune.cli import main

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def args(out):
        return [
            "--model",
            str(tiny_dir),
            "--seeds",
            str(seeds_file),
            "--n",
            "50",
            "--max-rounds",
            "4",
            "--prompts-per-round",
            "2",
            "--max-new-tokens",
            "12",
            "--seed",
            "1",
            "--out",
            str(out),
        ]

    killed = _launch(args(tmp_path / "b.jsonl"), env)
    checkpoint = tmp_path / "b.jsonl.work" / CHECKPOINT
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None:
        if checkpoint.exists() and json.loads(checkpoint.read_text())["rounds"] >= 1:
            break
        time.sleep(0.02)
    assert killed.poll() is None, killed.communicate()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b.jsonl").exists()  # no output until the run is complete
    # gibberish from a random model keeps no instruction: each run says so (exit 2) and writes no --out at all
    assert main(["data", "self-instruct", *args(tmp_path / "a.jsonl")]) == 2
    assert "no instruction was kept" in capsys.readouterr().err
    assert main(["data", "self-instruct", *args(tmp_path / "b.jsonl"), "--resume"]) == 2
    out = capsys.readouterr().out
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()
    tasks = [(tmp_path / f"{x}.jsonl.work" / "tasks.jsonl").read_bytes() for x in "ab"]
    assert tasks[0] == tasks[1]
    report = json.loads((tmp_path / "b.jsonl.work" / "report.json").read_text())
    assert report == json.loads((tmp_path / "a.jsonl.work" / "report.json").read_text())
    assert report["rounds"] == 4 and "after 4 rounds" in out
    # gibberish from a random model: every generated instruction is accounted for by a drop reason or kept
    log = [json.loads(x) for x in (tmp_path / "a.jsonl.work" / PROGRESS).read_text().splitlines()]
    assert sum(len(r["dropped"]) for r in log) == sum(report["dropped"].values()) > 0
