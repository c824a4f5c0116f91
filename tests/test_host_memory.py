"""glibc keeps freed memory during training (train/host_memory.py), and gives it back afterwards.

Observed through the process's resident set: a touched 256 MiB tensor, once freed, leaves the process under
glibc's defaults, stays in it inside `kept()`, and leaves again when the block ends. Training losses do not
depend on the setting (memory reuse changes no arithmetic)."""

import json
import os

import pytest
import torch

from deltatune.config import load_config
from deltatune.testing import tiny_model, tiny_tokenizer
from deltatune.train import host_memory, loop

MIB = 2**20
REAL_KEPT = host_memory.kept
needs_glibc = pytest.mark.skipif(
    host_memory._glibc() is None or host_memory.user_tuned_malloc(),
    reason="glibc's malloc with its default settings (Linux)",
)


def resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def touch_and_free(mib: int = 256) -> None:
    t = torch.ones(mib * MIB // 4)  # every page written
    del t


@needs_glibc
def test_freed_memory_stays_within_the_block_and_leaves_after_it():
    before = resident_bytes()
    touch_and_free()
    assert resident_bytes() - before < 64 * MIB  # glibc's default: unmapped on free
    with host_memory.kept() as applied:
        assert applied
        touch_and_free()
        assert resident_bytes() - before > 200 * MIB  # kept for the next step
    assert resident_bytes() - before < 64 * MIB  # handed back on exit
    touch_and_free()
    assert resident_bytes() - before < 64 * MIB  # and the defaults are back


class RecordingLibc:
    """glibc's two calls, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_on_exit_glibc_is_left_as_a_warmed_up_process_not_at_its_initial_thresholds(monkeypatch):
    """Setting any threshold turns glibc's own mmap-threshold adjustment off for good; leaving it at the initial
    128 KiB would map every later block above 128 KiB fresh (a page fault per 4 KiB of each evaluation tensor).
    On exit it is set where the adjustment ends up: 32 MiB (64-bit), trimming above twice that."""
    libc = RecordingLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    monkeypatch.setattr(host_memory, "user_tuned_malloc", lambda: False)
    with host_memory.kept() as applied:
        assert applied
        assert libc.calls == [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]  # no mmap, no trim
    assert libc.calls[2:] == [
        ("mallopt", -4, 65536),
        ("mallopt", -3, 32 * MIB),
        ("mallopt", -1, 64 * MIB),
        ("malloc_trim", 0),
    ]


@needs_glibc
def test_a_user_setting_in_the_environment_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    with host_memory.kept() as applied:
        assert not applied
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    with host_memory.kept() as applied:
        assert not applied


def test_disabled_does_nothing():
    with host_memory.kept(False) as applied:
        assert not applied


def _train_losses(monkeypatch, tmp_path, data_file, setting: str, asked: list) -> list[float]:
    model = tiny_model(0)
    monkeypatch.setattr(
        "deltatune.models.load_model", lambda name, dtype=None, **kw: (model.to(dtype), tiny_tokenizer())
    )
    monkeypatch.setattr("deltatune.models.load_tokenizer", lambda name, **kw: tiny_tokenizer())
    monkeypatch.setattr("deltatune.models.model_skeleton", lambda name, **kw: None)

    def spy(enabled: bool = True):
        asked.append(enabled)
        return REAL_KEPT(enabled)

    monkeypatch.setattr(host_memory, "kept", spy)
    out = tmp_path / setting
    cfg = load_config(
        overrides=dict(
            data=str(data_file),
            output=str(out),
            method="full",
            batch_size=2,
            seq_len=64,
            precision="fp32",
            steps=4,
            eval_fraction=0.0,
            warmup_steps=0,
            fused_norms="off",
            keep_freed_memory=setting,
            log_every=1,
        )
    )
    loop.train(cfg, quiet=True)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_on_cpu_keeps_memory_by_default_and_its_losses_do_not_change(monkeypatch, tmp_path, data_file):
    asked: list[bool] = []
    auto = _train_losses(monkeypatch, tmp_path, data_file, "auto", asked)
    off = _train_losses(monkeypatch, tmp_path, data_file, "off", asked)
    assert asked == [True, False]  # auto on CPU means on
    assert len(auto) == 4 and auto == off  # bitwise
