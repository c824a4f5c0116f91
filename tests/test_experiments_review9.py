"""Review 9 of the experiments. Each test failed before its fix."""

from __future__ import annotations

import json


def test_an_earlier_masking_report_is_archived_with_its_recorded_summary(tmp_path):
    # recorded.json stayed behind when an earlier report of other settings was moved to reports/: the new
    # invocation overwrote it, and the archived report lost the summary `deltatune stats` quotes
    from deltatune.experiments.common import Context

    out = tmp_path / "exp"
    ctx = Context("masking", out, quick=True, seeds=[0], quiet=True, model="unused", settings={"sizes": "2"})
    earlier = {"experiment": "masking", "settings": {"sizes": "2"}, "finished": "2026-12-01T00:00:00Z"}
    (out / "results.json").write_text(json.dumps(earlier))
    (out / "recorded.json").write_text('{"gains": "earlier"}\n')
    ctx = Context("masking", out, quick=True, seeds=[0, 1], quiet=True, model="unused", settings={"sizes": "4"})
    ctx.keep_earlier_report()
    kept = out / "reports" / "2026-12-01T000000Z"
    assert (kept / "recorded.json").read_text() == '{"gains": "earlier"}\n'
    assert not (out / "recorded.json").exists() and (kept / "results.json").exists()
