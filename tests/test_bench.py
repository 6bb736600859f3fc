"""The bench's helpers, fast: device description, the yardstick GEMM, the report's tables, the roofline
targets, the static check's cache, and how pytest finds the bench files. No case is timed here."""
import configparser
import fnmatch
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import machine, roofline, running, tables

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags, isa", [
    ({"avx2", "fma"}, "AVX2"), ({"avx2", "avx512f"}, "AVX-512"), ({"avx512f", "avx512_bf16"}, "AVX-512 BF16"),
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AMX"), ({"sse4_2"}, "pre-AVX2")])
def test_cpu_isa_from_flags(flags, isa, monkeypatch):
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    assert machine.cpu_isa(frozenset(flags)) == isa


def test_describe_names_the_cpu_isa_and_threads():
    info = machine.describe("cpu")
    assert info["kind"] == "cpu" and info["isa"] in info["label"] and f"{info['threads']} thread" in info["label"]
    assert ("native bf16" in info["label"]) == machine.native_bf16("cpu")


def test_gemm_throughput_small():
    r = machine.gemm_throughput("cpu", torch.float32, (32, 64, 16), rounds=3)
    assert r["shape"] == [32, 64, 16] and r["flops_per_s"] == pytest.approx(2 * 32 * 64 * 16 / r["median_s"])


def _bench(case, impl, params, median_s, **info):
    info = {"case": case, "impl": impl, "params": params, "device": "CPU test (ISA AVX2)", "device_kind": "cpu",
            "isa": "AVX2", "threads": 2, **info}
    return {"name": f"{case}[{impl}]", "extra_info": info, "stats": {"median": median_s, "iqr": 0.0, "rounds": 3,
                                                                      "q1": median_s, "q3": median_s}}


HEAD = {"B": 16, "K": 4}
BENCHMARKS = [
    _bench("c2f_head_step", "fused", HEAD, 0.2, flops=16e9, gemm_flops_per_s=160e9, ops=200, peak_bytes=30,
           sweep="K", minimal_flops=12.8e9, minimal_formula="B (8 P C N)"),
    _bench("c2f_head_step", "fused_compiled", HEAD, 0.1, flops=16e9, gemm_flops_per_s=160e9, compile_s=50.0,
           graph_breaks=0, peak_bytes=30, sweep="K"),
    _bench("c2f_head_step", "reference", HEAD, 1.6, flops=40e9, gemm_flops_per_s=160e9, ops=900, peak_bytes=600,
           sweep="K"),
    _bench("c2f_head_step", "compiled", HEAD, 1.2, flops=40e9, compile_s=80.0, peak_bytes=500, sweep="K"),
    _bench("attention_h1", "fused", {"B": 4, "heads": 1, "C": 512, "amp": "off"}, 0.5, flops=1e9, ops=270,
           gemm_flops_per_s=160e9, peak_bytes=100, reduced_shape=True),
]
NOTES = [{"case": "attention_h1", "impl": "fused", "params": {"B": 4, "heads": 1, "C": 512, "amp": "bf16"},
          "what": "bf16 autocast", "error": "bf16 autocast failed: RuntimeError: dtype"}]


def test_gemm_fraction_and_its_gaps():
    fused = BENCHMARKS[0]
    assert tables.gemm_fraction(fused) == pytest.approx(16e9 / 0.2 / 160e9)
    assert tables.gemm_fraction(BENCHMARKS[3]) is None                      # no yardstick recorded
    triton = dict(fused, extra_info=dict(fused["extra_info"], flops_complete=False))
    assert tables.gemm_fraction(triton) is None                             # FLOPs inside Triton kernels unknown
    cuda = dict(fused, extra_info=dict(fused["extra_info"], median_s=0.1))  # CUDA events take precedence
    assert tables.median_ms(cuda) == pytest.approx(100.0)


def test_minimal_algebra_fraction():
    fused = BENCHMARKS[0]
    assert tables.minimal_gflops(fused) == pytest.approx(12.8e9 / 0.2 / 1e9)
    assert tables.minimal_fraction(fused) == pytest.approx(12.8e9 / 0.2 / 160e9)
    assert tables.minimal_fraction(BENCHMARKS[2]) is None                   # no minimal algebra recorded


def test_minimal_algebra_of_the_attention_matches_the_issue():
    from bench import algebra
    b, c, n, p = 16, 2048, 196, 312
    assert algebra.attention(b, c, n, p, 1, True)[0] == b * 8 * p * c * n + 6 * p * c * c


def test_readme_tables():
    main = tables.readme_table(BENCHMARKS, NOTES)
    row = next(line for line in main.splitlines() if line.startswith("| c2f_head_step"))
    assert "| 200.0 | 1600.0 | 8.00x | 64.0 | 0.40 | 1200.0 (6.00x) | 0.05 | 0.50 | 200 / 900 | AVX2, 2 thr |" in row
    assert "**c2f_head_step**: B (8 P C N)" in main                            # the formula is named
    assert "attention_h1" not in main                                        # no reference: not a headline row
    compiled = tables.compile_table(BENCHMARKS, NOTES)
    assert "| 200.0 | 100.0 | 2.00x | 50.0 | 0 | 80.0 | AVX2, 2 thr |" in compiled
    dtype = tables.dtype_table(BENCHMARKS, NOTES)
    assert "| attention_h1 | B=4, C=512, heads=1 | c2f | 500.0 | **bf16 autocast failed" in dtype


def test_compile_failure_is_reported():
    ok = [b for b in BENCHMARKS if b["extra_info"]["impl"] != "fused_compiled"]
    notes = [{"case": "c2f_head_step", "impl": "fused_compiled", "params": HEAD,
              "error": "torch.compile(c2f) failed: Unsupported: graph break"}]
    assert "**torch.compile(c2f) failed: Unsupported: graph break**" in tables.compile_table(ok, notes)


def test_junit_outcomes_keep_failures_and_xfails(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase name="a"><failure message="boom"/></testcase>'
                   '<testcase name="b"><skipped type="pytest.xfail" message="bf16 autocast failed: x"/></testcase>'
                   '<testcase name="c"><skipped type="pytest.skip" message="too slow"/></testcase>'
                   '</testsuite></testsuites>')
    assert running.junit_outcomes(xml) == ["a: failure: boom", "b: xfail: bf16 autocast failed: x"]


def test_roofline_targets():
    assert {"A100", "H100", "RTX4090"} <= set(roofline.TARGETS)
    op = roofline.attention_fwd(roofline.Shape(), "bf16")[1]
    t = roofline.TARGETS
    assert op.time_s(t["RTX4090"]) > op.time_s(t["A100"]) > op.time_s(t["H100"])
    text = roofline.markdown()
    assert "RTX 4090" in text and "A100" in text and "H100" in text and "not measurements" in text


def test_static_check_is_reused_while_the_kernels_are_unchanged(tmp_path, monkeypatch):
    key = running._inspect_key(running.STATIC_TARGETS, True)
    (tmp_path / "inspect.json").write_text(json.dumps({"key": key, "exit": 0, "kernels": [{"kernel": "k"}]}))

    def no_run(*args, **kwargs):
        raise AssertionError("the cached result should have been reused")

    monkeypatch.setattr(running, "run_cmd", no_run)
    static = running.run_inspect(tmp_path, deadline=0)
    assert static["reused"] and static["kernels"] == [{"kernel": "k"}]
    (tmp_path / "inspect.json").write_text(json.dumps({"key": "stale", "exit": 0, "kernels": []}))
    with pytest.raises(AssertionError, match="reused"):
        running.run_inspect(tmp_path, deadline=0)


def test_bench_files_are_collected_by_their_own_ini_only():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "bench" / "pytest.ini")
    patterns = ini["pytest"]["python_files"].split()
    bench_files = sorted(p.name for p in (ROOT / "bench").glob("bench_*.py"))
    assert bench_files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in bench_files)
    assert "pytest_collect_file" not in (ROOT / "bench" / "conftest.py").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'testpaths = ["tests"]' in pyproject


@pytest.mark.slow
def test_bench_collection_through_the_ini():
    """What the report runs: ``pytest -c bench/pytest.ini bench/`` finds the cases (collection only)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-c", "bench/pytest.ini", "--rootdir", ".", "bench",
                          "--collect-only", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "bench/bench_c2f_head.py::test_head_b16_k4[fused_compiled]" in out.stdout
    assert "bench/bench_amp.py::test_head_amp[bf16]" in out.stdout


def test_no_bench_file_over_400_lines():
    long = {p.name: n for p in (ROOT / "bench").glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long
