"""The static GPU check (``python -m c2f.kernels.inspect``): compiles the launchers' plans for every
target without a GPU.

The project's kernels are decorated for the interpreter in this process (tests/conftest.py), so their
compiles run in a subprocess; the toy kernel is a compiled-mode JITFunction whatever the environment.
The toy kernels below are the check's own fixtures: one that uses tensor cores without spilling and
one whose tile cannot fit in registers.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from c2f.kernels import inspect as kinspect
from c2f.kernels import targets
from c2f.kernels.launch import KernelPlan, Launch

ROOT = Path(__file__).resolve().parents[1]
REAL_OPS = ("part_attention", "part_mixup")


def _toy_dot(A_ptr, B_ptr, C_ptr, M, N, K, stride_am, stride_bk, stride_cm,
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


# Compiled-mode JIT function whatever TRITON_INTERPRET says: the offline compile needs one.
_toy_dot_kernel = JITFunction(_toy_dot)


def toy_launches() -> list[Launch]:
    """A bf16 matmul at a sane tile (tensor cores, no spills) and an fp32 one at 2 warps that spills,
    as a launcher would record them (meta tensors: 16-aligned pointers; K = 256 16-aligned, M = 100 not)."""
    def launch(dtype, block, warps, stages):
        a, b, c = (torch.empty(256, 256, dtype=dtype, device="meta") for _ in range(3))
        args = dict(A_ptr=a, B_ptr=b, C_ptr=c, M=100, N=256, K=256, stride_am=256, stride_bk=256, stride_cm=256)
        plan = KernelPlan(grid=(1, 1), constexprs=dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), block, strict=True)),
                          num_warps=warps, num_stages=stages)
        return Launch(_toy_dot_kernel, plan, args)
    return [launch(torch.bfloat16, (128, 128, 64), 8, 3), launch(torch.float32, (128, 64, 64), 2, 1)]


def _compile_toys_main() -> None:
    """Subprocess entry: compile the toy launches, print their reports as JSON."""
    from dataclasses import asdict
    good, spills = toy_launches()
    reports = [kinspect.compile_launch(good, targets.TARGETS[t], "toy") for t in ("sm_80", "sm_90", "gfx942")]
    reports.append(kinspect.compile_launch(spills, targets.TARGETS["sm_90"], "toy_spills"))
    print(json.dumps([asdict(r) for r in reports]))


def _clean_env(cache: str = "off") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env[kinspect.CACHE_ENV] = cache   # off: the toys compile every time, and no user cache is touched
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def toy_reports():
    code = "from tests.test_inspect import _compile_toys_main; _compile_toys_main()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(r["op"], r["target"]): r for r in json.loads(proc.stdout.strip().splitlines()[-1])}


def test_toy_compiles_with_tensor_cores(toy_reports):
    sm80, sm90, amd = toy_reports[("toy", "sm_80")], toy_reports[("toy", "sm_90")], toy_reports[("toy", "gfx942")]
    for r in (sm80, sm90, amd):
        assert r["ok"], r["error"]
        assert 0 < r["regs"] <= 255
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert r["ctas_per_sm"] >= 1
    # The pipelined loop keeps at least one stage of the [128, 64] A and [64, 128] B bf16 tiles in
    # shared memory (32 KiB), and with 3 stages more than one.
    assert sm80["smem_bytes"] > 32 * 1024 and sm90["smem_bytes"] > 32 * 1024
    assert sm80["tensor_cores"].startswith("HMMA")
    assert "HGMMA" in sm90["tensor_cores"]
    assert amd["tensor_cores"] == "mfma" and amd["smem_limit"] == 64 * 1024


def test_toy_spill_is_reported(toy_reports):
    r = toy_reports[("toy_spills", "sm_90")]
    assert r["ok"], r["error"]
    assert r["spill_stores"] > 0 and r["spill_loads"] > 0
    report = kinspect.KernelReport(**r)
    assert report.spills and report.problems()
    assert "spills" in kinspect.format_table([report])


def test_parse_ptxas_log():
    log = ("ptxas info    : Function properties for _k\n"
           "    16 bytes stack frame, 24 bytes spill stores, 28 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 416 bytes cmem[0]\n")
    assert kinspect.parse_ptxas_log(log) == {"regs": 255, "spill_stores": 24, "spill_loads": 28,
                                             "stack_bytes": 16, "static_smem": 4096}
    assert kinspect.parse_ptxas_log("nothing here") == {}


def test_recorded_signature_is_the_jits():
    """Argument types and divisibility come from the JIT's own specialisation of the recorded arguments."""
    src, options = kinspect.compile_source(toy_launches()[0], targets.TARGETS["sm_90"])
    assert src.signature["A_ptr"] == "*bf16" and src.signature["BLOCK_K"] == "constexpr"
    names = list(src.signature)
    assert src.attrs[(names.index("K"),)] == [["tt.divisibility", 16]]   # 256: 16-aligned
    assert not src.attrs.get((names.index("M"),))                         # 100: not
    assert options["num_warps"] == 8 and options["num_stages"] == 3


def test_problems_and_exit_status():
    ok = kinspect.KernelReport("m", "k", "sm_90", "", 4, 2, ok=True, regs=64, spill_stores=0, spill_loads=0,
                               smem_bytes=1024, smem_limit=2048, ctas_per_sm=2)
    spill = kinspect.KernelReport("m", "k", "sm_80", "", 4, 2, ok=True, regs=255, spill_stores=4, spill_loads=4,
                                  smem_bytes=1024, smem_limit=2048, ctas_per_sm=1)
    smem = kinspect.KernelReport("m", "k", "sm_86", "", 4, 2, ok=True, regs=64, spill_stores=0, spill_loads=0,
                                 smem_bytes=4096, smem_limit=2048, ctas_per_sm=0)
    failed = kinspect.KernelReport("m", "k", "sm_80", "", 4, 2, ok=False, error="boom")
    assert kinspect.exit_status([ok]) == 0
    assert kinspect.exit_status([ok, spill]) == 1
    assert kinspect.exit_status([ok, failed]) == 1
    assert len(smem.problems()) == 2 and kinspect.exit_status([ok, smem]) == 1
    assert kinspect.exit_status([]) == 1


def test_occupancy_bounds():
    sm90, sm80, gfx = targets.TARGETS["sm_90"], targets.TARGETS["sm_80"], targets.TARGETS["gfx942"]
    # 128 regs x 256 threads = 32768 of 65536 registers: two blocks; 100 KiB (+1 reserved) of 228 KiB: two.
    assert kinspect.occupancy(sm90, regs=128, smem=100 * 1024, num_warps=8) == 2
    assert kinspect.occupancy(sm90, regs=32, smem=0, num_warps=4) == 16           # warps: 64 / 4
    assert kinspect.occupancy(sm80, regs=64, smem=200 * 1024, num_warps=4) == 0   # does not fit an A100
    # AMD: 128 VGPRs -> 4 waves per SIMD, 16 per CU, 4-wave workgroups: 4; 32 KiB of 64 KiB LDS: 2.
    assert kinspect.occupancy(gfx, regs=128, smem=32 * 1024, num_warps=4) == 2


def test_launcher_plans_are_what_is_inspected(monkeypatch):
    """The inspected launches are the launchers' own: change the tiles the plans choose from and the
    recorded launch (so the compiled kernel) changes with it."""
    from c2f.kernels import plans, plans_part_attention
    sm90 = targets.TARGETS["sm_90"]
    # N = 324: the tiled kernels (past plans_part_attention.ROW_TOKENS); N = 196: the short-row ones.
    run = dict(kinspect.cases()["part_attention"])["N=324 h=1 fp32"]
    short = dict(kinspect.cases(quick=True)["part_attention"])["N=196 h=1 fp32"]
    before = {launch.name: launch.plan.constexprs for launch in kinspect.record(sm90, run)}
    short_before = {launch.name: dict(launch.plan.constexprs) for launch in kinspect.record(sm90, short)}
    monkeypatch.setattr(plans, "GEMM_LADDER", (plans.GemmTiles(64, 32, 32, stages=2, warps=4),))
    monkeypatch.setattr(plans_part_attention, "ROWS_FWD_BLOCK_Q", 16)
    after = {launch.name: (launch.plan.constexprs, launch.plan.num_stages) for launch in kinspect.record(sm90, run)}
    short_after = {launch.name: launch.plan.constexprs for launch in kinspect.record(sm90, short)}
    assert before["_part_attention_fwd_scores_kernel"]["BLOCK_Q"] == 128
    assert after["_part_attention_fwd_scores_kernel"] == (dict(BLOCK_Q=64, BLOCK_N=32, BLOCK_K=32,
                                                               DOT_PRECISION="tf32"), 2)
    assert short_before["_part_attention_fwd_rows_kernel"]["BLOCK_Q"] == 32
    assert short_after["_part_attention_fwd_rows_kernel"] == dict(short_before["_part_attention_fwd_rows_kernel"],
                                                                  BLOCK_Q=16)


def test_tensor_cores_from_ptx():
    ptx = ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...};\n"
           "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};\n"
           "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {...};\n")
    assert kinspect.tensor_core_use(ptx) == "HGMMA x1, HMMA x2"
    assert kinspect.tensor_core_use("tcgen05.mma.cta_group::1.kind::tf32 [%r1], ...") == "UTCHMMA x1"
    assert kinspect.tensor_core_use("fma.rn.f32 %f1, %f2, %f3, %f4;") == "no"


def test_parse_amdgcn_spills():
    """VGPR spills count; SGPR spills to VGPR lanes are reported apart unless the kernel needs scratch."""
    asm = (".vgpr_count: 128\n .agpr_count: 8\n .vgpr_spill_count: 0\n .sgpr_spill_count: 12\n"
           " .private_segment_fixed_size: 0\n .group_segment_fixed_size: 16384\n")
    assert kinspect.parse_amdgcn(asm) == {"regs": 136, "spill_stores": 0, "sgpr_spills": 12, "stack_bytes": 0,
                                          "lds": 16384}
    lane_spills = kinspect.KernelReport("m", "k", "gfx942", "", 4, 2, ok=True, regs=136, spill_stores=0, spill_loads=0,
                                        stack_bytes=0, sgpr_spills=12, smem_bytes=16384, smem_limit=65536,
                                        ctas_per_sm=2)
    assert not lane_spills.problems() and "+12 SGPR" in kinspect.format_table([lane_spills])
    scratch = dataclasses.replace(lane_spills, stack_bytes=64)
    assert scratch.problems() == ["64 B of stack (local / scratch memory)"]


def test_plan_bound_is_checked():
    """Compiled shared memory above the plan's own bound fails the check even within the hardware limit:
    the rule that chose the tiles would be wrong for a device with less."""
    report = kinspect.KernelReport("m", "k", "sm_90", "", 8, 3, ok=True, regs=128, spill_stores=0, spill_loads=0,
                                   smem_bytes=80 * 1024, smem_limit=227 * 1024, smem_bound=64 * 1024, ctas_per_sm=1)
    assert report.problems() == ["shared memory 80.0 KiB over the plan's own bound 64.0 KiB (plans.py: the rule "
                                 "that picked the tiles is wrong)"]


def test_every_kernel_is_in_the_grid():
    """Every @triton.jit kernel the launchers can launch appears in the inspected grid (the full one: the quick
    grid, N = 196 only, runs the short-row attention kernels and not the tiled ones)."""
    from c2f.kernels import c2f_head_bwd, c2f_head_fwd, part_attention_bwd, part_attention_fwd, part_mixup
    recorded = {launch.name for op in kinspect.cases().values() for _, run in op
                for launch in kinspect.record(targets.TARGETS["sm_90"], run)}
    defined = {name for module in (part_attention_fwd, part_attention_bwd, part_mixup, c2f_head_fwd, c2f_head_bwd)
               for name in dir(module) if name.endswith("_kernel") and name.startswith(("_part", "_c2f"))}
    assert defined <= recorded, defined - recorded


@pytest.mark.slow
def test_inspect_command_on_real_kernels(tmp_path):
    """`python -m c2f.kernels.inspect --arch sm_90 --quick --op part_attention part_mixup` exits 0: every
    plan compiles, none spills, all fit. One target at N = 196 only: `make inspect` runs the whole grid,
    the head's kernels included (about two dozen more compiles than this test can afford), on every target."""
    def inspect(out):
        proc = subprocess.run([sys.executable, "-m", "c2f.kernels.inspect", "--arch", "sm_90", "--quick", "--jobs",
                               "1", "--op", *REAL_OPS, "--json", str(out)], cwd=ROOT,
                              env=_clean_env(str(tmp_path / "cache")), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"kernels.inspect failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return json.loads(out.read_text())["kernels"], proc.stderr

    rows, _ = inspect(tmp_path / "inspect.json")
    assert set(REAL_OPS) <= {r["op"] for r in rows}
    for r in rows:
        assert r["ok"] and r["spill_stores"] == 0 and r["smem_bytes"] <= r["smem_limit"], r
        assert not r["cached"]
    assert {r["target"] for r in rows} == {"sm_90"}
    # Run again: every figure comes from the result cache, the same as compiled.
    again, log = inspect(tmp_path / "again.json")
    assert all(r["cached"] for r in again) and f"0 compiled, {len(rows)} from the cache" in log
    figures = ("kernel", "plan", "regs", "spill_stores", "smem_bytes", "ctas_per_sm", "tensor_cores")
    assert [[r[k] for k in figures] for r in again] == [[r[k] for k in figures] for r in rows]


def test_cache_key_follows_the_kernel_and_plan(tmp_path, monkeypatch):
    """The result cache is keyed on what the compile depends on: a changed plan or kernel source is a
    new key; an entry is written atomically and read back; off means neither."""
    monkeypatch.setenv(kinspect.CACHE_ENV, str(tmp_path))
    good, spills = toy_launches()
    sm90 = targets.TARGETS["sm_90"]
    key = kinspect.compile_key(*kinspect.compile_source(good, sm90), sm90)
    assert key == kinspect.compile_key(*kinspect.compile_source(toy_launches()[0], sm90), sm90)
    sm80 = targets.TARGETS["sm_80"]
    assert key != kinspect.compile_key(*kinspect.compile_source(good, sm80), sm80)
    assert key != kinspect.compile_key(*kinspect.compile_source(spills, sm90), sm90)
    assert key != kinspect.compile_key(*kinspect.compile_source(good, sm90), sm90, derivation="other parser")
    edited = JITFunction(_toy_dot)
    edited._unsafe_update_src(edited.src.replace("acc += tl.dot(a, b)", "acc += tl.dot(a, b) * 2"))
    assert key != kinspect.compile_key(*kinspect.compile_source(Launch(edited, good.plan, good.args), sm90), sm90)
    entry = dict(regs=1, spill_stores=0, spill_loads=0, stack_bytes=0, sgpr_spills=None, smem_bytes=2,
                 tensor_cores="no", compile_s=0.5)
    kinspect.cache_write(key, entry)
    assert kinspect.cache_read(key) == entry and [p.name for p in tmp_path.iterdir()] == [f"{key}.json"]
    (tmp_path / f"{key}.json").write_text("{half")
    assert kinspect.cache_read(key) is None
    (tmp_path / f"{key}.json").write_text(json.dumps(dict(entry, regs="many")))
    assert kinspect.cache_read(key) is None
    monkeypatch.setenv(kinspect.CACHE_ENV, "off")
    assert kinspect.cache_dir() is None and kinspect.cache_read(key) is None
