"""step_anatomy.py's account of a oneDNN verbose log: the matmul time and primitive creations quoted in
docs/benchmarks.md are sums over these lines, so a parser that took the wrong field or counted the
header lines would misstate them. The lines below are oneDNN 3.x's own format (v1)."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

LOG = """\
onednn_verbose,v1,info,oneDNN v3.12.0 (commit 80afa71049cd69a3df32adcccb623b12cd7baa22)
onednn_verbose,v1,info,cpu,runtime:OpenMP,nthr:2
onednn_verbose,v1,primitive,info,template:operation,engine,primitive,implementation,prop_kind,memory_descriptors,attributes,auxiliary,problem_desc,exec_time
RESULT {"median_s": {}}
onednn_verbose,v1,primitive,create:cache_miss,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:ab::f0 wei:bf16::blocked:ab::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,64x128:128x32,0.5
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:ab::f0 wei:bf16::blocked:ab::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,64x128:128x32,2.25
onednn_verbose,v1,primitive,create:cache_hit,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:ab::f0 wei:bf16::blocked:ab::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,64x128:128x32,0.01
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:ab::f0 wei:bf16::blocked:ab::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,64x128:128x32,1.75
onednn_verbose,v1,graph,info,template:operation,engine,partition_id,partition_kind,op_names,data_formats,logical_tensors,fpmath_mode,implementation,backend,exec_time
"""


@pytest.fixture
def step_anatomy(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import step_anatomy

    yield step_anatomy
    sys.modules.pop("step_anatomy", None)


def test_onednn_totals_sum_execution_and_creation_in_seconds(step_anatomy):
    totals = step_anatomy.onednn_totals(LOG)
    assert totals["exec_calls"] == 2
    assert totals["exec_s"] == pytest.approx(0.004)  # 2.25 + 1.75 ms
    assert totals["create_misses"] == 1
    assert totals["create_miss_s"] == pytest.approx(0.0005)
    assert totals["create_hit_s"] == pytest.approx(0.00001)


def test_onednn_totals_of_a_log_without_primitives_are_zero(step_anatomy):
    header = "\n".join(LOG.splitlines()[:4])
    assert step_anatomy.onednn_totals(header) == {
        "exec_s": 0.0,
        "exec_calls": 0,
        "create_miss_s": 0.0,
        "create_misses": 0,
        "create_hit_s": 0.0,
    }
