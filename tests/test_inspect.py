"""The static GPU check (``python -m c2f.kernels.inspect``): compiles for sm_80/sm_90 without a GPU.

Compilation must happen in a process without ``TRITON_INTERPRET=1`` (tests/conftest.py sets it, and a
kernel decorated under the interpreter cannot be compiled), so every compile here runs in a subprocess.
The toy kernels below are the check's own fixtures: one that uses tensor cores without spilling and
one whose tile cannot fit in registers.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import triton
import triton.language as tl

from c2f.kernels import inspect as kinspect
from c2f.kernels.config import KernelSpec

ROOT = Path(__file__).resolve().parents[1]
REAL_MODULES = ("part_attention", "part_mixup")


@triton.jit
def _toy_dot_kernel(A_ptr, B_ptr, C_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A_ptr + rm[:, None] * stride_am + (k + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k + rk)[None, :] < K), other=0.0)
        b = tl.load(B_ptr + (k + rk)[:, None] * stride_bk + rn[None, :],
                    mask=((k + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    tl.store(C_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(C_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def toy_specs() -> list[KernelSpec]:
    """A bf16 matmul at a sane tile (tensor cores, no spills) and an fp32 one at 2 warps that spills."""
    def signature(dtype):
        return {"A_ptr": dtype, "B_ptr": dtype, "C_ptr": dtype, "M": "i32", "N": "i32", "K": "i32",
                "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32"}
    aligned = ("A_ptr", "B_ptr", "C_ptr", "K", "stride_am", "stride_bk", "stride_cm")
    return [
        KernelSpec("toy_dot", _toy_dot_kernel, signature("*bf16"),
                   {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3, aligned=aligned),
        KernelSpec("toy_dot_spills", _toy_dot_kernel, signature("*fp32"),
                   {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=2, num_stages=1),
    ]


def _compile_toys_main() -> None:
    """Subprocess entry: compile the toy specs, print their reports as JSON."""
    from dataclasses import asdict
    specs = toy_specs()
    reports = [kinspect.inspect_spec(specs[0], arch, "toy") for arch in (80, 90)]
    reports.append(kinspect.inspect_spec(specs[1], 90, "toy"))
    print(json.dumps([asdict(r) for r in reports]))


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def toy_reports():
    code = "from tests.test_inspect import _compile_toys_main; _compile_toys_main()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(r["kernel"], r["arch"]): r for r in json.loads(proc.stdout.strip().splitlines()[-1])}


def test_toy_compiles_with_tensor_cores(toy_reports):
    sm80, sm90 = toy_reports[("toy_dot", 80)], toy_reports[("toy_dot", 90)]
    for r in (sm80, sm90):
        assert r["ok"], r["error"]
        assert 0 < r["regs"] <= 255
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert r["ctas_per_sm"] >= 1
    # The pipelined loop keeps at least one stage of the [128, 64] A and [64, 128] B bf16 tiles in
    # shared memory (32 KiB), and with 3 stages more than one.
    assert sm80["smem_bytes"] > 32 * 1024 and sm90["smem_bytes"] > 32 * 1024
    assert sm80["tensor_cores"].startswith("HMMA") and sm80["tensor_core_source"] == "sass"
    assert "HGMMA" in sm90["tensor_cores"]


def test_toy_spill_is_reported(toy_reports):
    r = toy_reports[("toy_dot_spills", 90)]
    assert r["ok"], r["error"]
    assert r["spill_stores"] > 0 and r["spill_loads"] > 0
    report = kinspect.KernelReport(**{k: v for k, v in r.items()})
    assert report.spills
    assert "**SPILL**" in kinspect.format_table([report])


def test_parse_ptxas_log():
    log = ("ptxas info    : Function properties for _k\n"
           "    16 bytes stack frame, 24 bytes spill stores, 28 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 416 bytes cmem[0]\n")
    assert kinspect.parse_ptxas_log(log) == {"regs": 255, "spill_stores": 24, "spill_loads": 28,
                                             "stack_bytes": 16, "static_smem": 4096}
    assert kinspect.parse_ptxas_log("nothing here") == {}


def test_occupancy_bounds():
    # 128 regs x 256 threads = 32768 of 65536 registers: two CTAs; 100 KiB of 228 KiB smem: two.
    assert kinspect.occupancy(90, regs=128, smem=100 * 1024, num_warps=8) == 2
    assert kinspect.occupancy(90, regs=32, smem=0, num_warps=4) == 16          # warps: 64 / 4
    assert kinspect.occupancy(80, regs=64, smem=200 * 1024, num_warps=4) == 0  # does not fit an A100


def test_module_without_compile_specs_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "c2f.kernels._fake_no_specs", types.ModuleType("c2f.kernels._fake_no_specs"))
    with pytest.raises(AttributeError, match="compile_specs"):
        kinspect.load_specs("_fake_no_specs")


def test_compile_signature():
    spec = toy_specs()[0]
    signature, attrs = kinspect.compile_signature(spec)
    assert list(signature) == ["A_ptr", "B_ptr", "C_ptr", "M", "N", "K", "stride_am", "stride_bk", "stride_cm",
                               "BLOCK_M", "BLOCK_N", "BLOCK_K"]
    assert signature["BLOCK_K"] == "constexpr" and signature["A_ptr"] == "*bf16"
    assert attrs[(5,)] == [["tt.divisibility", 16]] and (3,) not in attrs  # K aligned, M not


def test_compile_signature_rejects_unknown_and_missing_arguments():
    spec = toy_specs()[0]
    spec.aligned = spec.aligned + ("Z_ptr",)
    with pytest.raises(ValueError, match="Z_ptr"):
        kinspect.compile_signature(spec)
    spec = toy_specs()[0]
    del spec.signature["M"]
    with pytest.raises(ValueError, match="'M'"):
        kinspect.compile_signature(spec)


def test_exit_status():
    ok = kinspect.KernelReport("m", "k", 90, 4, 2, ok=True, regs=64, spill_stores=0, spill_loads=0)
    spill = kinspect.KernelReport("m", "k", 80, 4, 2, ok=True, regs=255, spill_stores=4, spill_loads=4)
    failed = kinspect.KernelReport("m", "k", 80, 4, 2, ok=False, error="boom")
    assert kinspect.exit_status(["m"], [ok], []) == 0
    assert kinspect.exit_status(["m"], [ok, spill], []) == 1
    assert kinspect.exit_status(["m"], [ok, failed], []) == 1
    assert kinspect.exit_status(["m"], [ok], ["kernels.m: no compile_specs"]) == 1
    assert kinspect.exit_status([], [], []) == 1


def test_every_kernel_module_is_checked():
    assert set(REAL_MODULES) <= set(kinspect.kernel_modules())


@pytest.mark.slow
def test_inspect_command_on_real_kernels(tmp_path):
    """`python -m c2f.kernels.inspect --arch 90` on the project's kernels exits 0: all compile, none spills.

    sm_90 only: both archs take about 45 s of CPU for ~50 compiles, too long beside the rest of the
    suite on 2 cores; `make inspect` and `make bench` run sm_80 and sm_90.
    """
    out = tmp_path / "inspect.json"
    proc = subprocess.run([sys.executable, "-m", "c2f.kernels.inspect", "--arch", "90", "--json", str(out)],
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"kernels.inspect failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["errors"] == []
    checked = {r["module"] for r in result["kernels"]}
    assert set(REAL_MODULES) <= checked, f"modules without kernels in the report: {set(REAL_MODULES) - checked}"
    for r in result["kernels"]:
        assert r["ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert {r["arch"] for r in result["kernels"]} == {90}
