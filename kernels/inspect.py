"""Static GPU check: compile the launchers' own plans ahead of time for every target, read the resources.

    python -m c2f.kernels.inspect [--arch sm_80 sm_90 gfx942 ...] [--op part_attention ...] [--json PATH]
                                  [--quick] [--jobs N]

No GPU is needed. Every case of the shape grid (``cases()``: tokens N in {49, 196, 324, 576, 1024},
heads {1, 3, 16}, fp32/bf16/fp16, every mixup kernel, the head with K in {1, 4} views) calls the real
launchers on ``meta`` tensors inside ``launch.recording(target)``: the launches they would make are
recorded, with their plans for that target, and compiled with ``triton.compile`` exactly as the JIT
would (the argument types and divisibility come from the same arguments). Launches that compile to the same kernel are compiled
once and reported with every shape that maps to them.

Per kernel, plan and target: registers, spills, shared memory (LDS on AMD) against the target's
per-block limit (``targets.TARGETS``), tensor-core use (NVIDIA SASS) and an occupancy bound. The
command exits 1 on a compile error, a spill, shared memory over the limit or zero occupancy.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import targets as targets_mod
from .launch import TL_DTYPES, Launch, recording

TENSOR_CORE_SASS = re.compile(r"\b(HGMMA|HMMA|IMMA|UTCHMMA|UTCQMMA)\b")
REG_ALLOC_UNIT = 256          # NVIDIA: registers are allocated per warp in units of 256
RESERVED_SMEM_PER_BLOCK = 1024  # NVIDIA sm_80+: the system reserves 1 KiB of shared memory per block
VGPR_GRANULE = 8              # AMD CDNA: VGPRs are allocated in granules of 8
DEFAULT_TARGETS = tuple(targets_mod.TARGETS)


@dataclass
class KernelReport:
    """One distinct compiled kernel (kernel, plan, argument types) on one target."""
    op: str
    kernel: str
    target: str
    plan: str
    num_warps: int
    num_stages: int
    shapes: list[str] = field(default_factory=list)
    ok: bool = False
    regs: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_bytes: Optional[int] = None
    smem_bytes: Optional[int] = None
    smem_limit: Optional[int] = None
    tensor_cores: Optional[str] = None
    ctas_per_sm: Optional[int] = None
    compile_s: Optional[float] = None
    error: Optional[str] = None

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores) or bool(self.spill_loads)

    def problems(self) -> list[str]:
        """What makes this row fail the check (empty when it passes)."""
        if not self.ok:
            return [f"compile failed: {self.error}"]
        out = []
        if self.spills:
            out.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        if self.smem_bytes is not None and self.smem_limit is not None and self.smem_bytes > self.smem_limit:
            out.append(f"shared memory {self.smem_bytes / 1024:.1f} KiB over the {self.smem_limit / 1024:.0f} KiB "
                       "per-block limit")
        if self.ctas_per_sm == 0:
            out.append("zero occupancy (no block fits an SM)")
        return out


# ------------------------------------------------------------------------------------------- cases

ATTENTION_TOKENS = (49, 196, 324, 576, 1024)      # 7x7 .. 32x32 maps
ATTENTION_HEADS = (1, 3, 16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIXUP_VIEWS = (1, 4, 32)
HEAD_VIEWS = (1, 4)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _attention_case(n: int, h: int, dtype: torch.dtype) -> Callable[[], None]:
    from . import part_attention as pa

    c, p, b = (1536 if h == 3 else 2048), 312, 2    # C divisible by the heads; d = 512 or 128 or 2048

    def run():
        x = _meta(b, c, n, dtype=dtype)             # a [B, C, H, W] map viewed as [B, C, N]
        g, gamma, beta = _meta(h, p, c), _meta(c), _meta(c)
        parts, attn, probs, mean, rstd = pa.folded_fwd(x, g, gamma, beta, 1e-5, dtype, 16.0)
        for dattn in (_meta(b, p, n, dtype=dtype), None):
            pa.folded_bwd(x, g, gamma, attn, probs, mean, rstd, _meta(b, p, c, dtype=dtype), dattn, h, True, 16.0)
    return run


def _mixup_case(k: int, dtype: torch.dtype) -> Callable[[], None]:
    from . import part_mixup as pm

    b, p, c = 4, 312, 2048

    def run():
        parts, perm = _meta(b, p, c, dtype=dtype), _meta(b, dtype=torch.int64)
        if k == MIXUP_VIEWS[1]:      # the in-place kernels have no K: once per dtype
            pm.part_mixup_fwd_(parts, perm, _meta(b, p))
            pm.part_mixup_bwd_(parts, perm, _meta(b, p))
        mask = _meta(k, b, p)
        pm.part_mixup_pool_fwd(parts, perm, mask)
        pm.part_mixup_pool_bwd(_meta(k, b, c, dtype=dtype), perm, mask, dtype)
    return run


def _head_case(n: int, h: int, dtype: torch.dtype, k: int) -> Callable[[], None]:
    from . import c2f_head as ch

    c, p, b, classes = (1536 if h == 3 else 2048), 312, 2, 200

    def run():
        x = _meta(b, c, n, dtype=dtype)
        g, wrg, wcg = _meta(h, p, c), _meta(p, c), _meta(classes, c)
        perm, mask = _meta(b, dtype=torch.int64), _meta(k, b, p)
        attn, _, _, probs, zhat, mean, rstd = ch.c2f_head_fwd(x, g, wrg, wcg, perm, mask, 1e-5, 16.0)
        state = (attn, probs, zhat, mean, rstd)
        dpred, dlogits = _meta(b, p), _meta(k, b, classes)
        # Training (attention maps unused, frozen backbone), then every gradient with dx.
        ch.c2f_head_bwd(x, g, wrg, wcg, perm, mask, *state, None, dpred, dlogits, False, 16.0)
        ch.c2f_head_bwd(x, g, wrg, wcg, perm, mask, *state, _meta(b, p, n, dtype=dtype), dpred, dlogits, True, 16.0)
    return run


def cases(quick: bool = False) -> dict[str, list[tuple[str, Callable[[], None]]]]:
    """``{op: [(shape label, run)]}``: the shape grid every plan is checked at. ``quick``: the production
    shapes only (N = 196, 1 and 16 heads, K = 4 and 32 (4 for the head), fp32 and bf16)."""
    tokens, heads, views, head_views, dtypes = ((196,), (1, 16), (4, 32), (4,), DTYPES[:2]) if quick else \
        (ATTENTION_TOKENS, ATTENTION_HEADS, MIXUP_VIEWS, HEAD_VIEWS, DTYPES)
    attention = [(f"N={n} h={h} {TL_DTYPES[dt]}", _attention_case(n, h, dt))
                 for n in tokens for h in heads for dt in dtypes]
    mixup = [(f"K={k} {TL_DTYPES[dt]}", _mixup_case(k, dt)) for k in views for dt in dtypes]
    head = [(f"N={n} h={h} K={k} {TL_DTYPES[dt]}", _head_case(n, h, dt, k))
            for n in tokens for h in heads for k in head_views for dt in dtypes]
    return {"part_attention": attention, "part_mixup": mixup, "c2f_head": head}


# ----------------------------------------------------------------------------------------- compiling

def _jit_function(kernel):
    from triton.runtime.jit import JITFunction
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{kernel!r} is not a compiled-mode @triton.jit function (was TRITON_INTERPRET=1 set?)")
    return kernel


def compile_source(launch: Launch, target) -> tuple[Any, dict]:
    """``(ASTSource, options)`` for a recorded launch on ``target``: the JIT's own binder specialises
    the arguments (types, ints equal to 1, 16-byte divisibility) as a real launch would."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _jit_function(launch.kernel)
    backend = make_backend(target.gpu_target())
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.args, **launch.plan.constexprs, num_warps=launch.plan.num_warps,
                  num_stages=launch.plan.num_stages, debug=False,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def plan_key(launch: Launch, target) -> str:
    """What makes two launches the same compiled kernel: kernel, argument types, constexprs, options."""
    src, options = compile_source(launch, target)
    consts = ", ".join(f"{k}={v}" for k, v in sorted(launch.plan.constexprs.items()))
    sig = " ".join(f"{k}:{v}" for k, v in src.signature.items() if v != "constexpr")
    aligned = sorted(k for k, v in src.attrs.items() if v)
    return f"{launch.name} [{consts}] w{options['num_warps']} s{options['num_stages']} {sig} aligned {aligned}"


def _nvidia_tool(name: str) -> Optional[str]:
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, spill stores/loads, stack frame and static shared memory from a ``ptxas -v`` log."""
    out: dict[str, int] = {}
    if m := re.search(r"Used (\d+) registers", log):
        out["regs"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    if m := re.search(r"(\d+) bytes stack frame", log):
        out["stack_bytes"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes smem", log):
        out["static_smem"] = int(m.group(1))
    return out


def parse_amdgcn(asm: str) -> dict[str, int]:
    """Resource metadata of an AMD kernel from its amdgcn text: VGPRs (+AGPRs), spills, LDS bytes."""
    def value(key: str) -> int:
        m = re.search(rf"\.{key}:\s+(\d+)", asm)
        return int(m.group(1)) if m else 0
    return {"regs": value("vgpr_count") + value("agpr_count"), "spill_stores": value("vgpr_spill_count")
            + value("sgpr_spill_count"), "stack_bytes": value("private_segment_fixed_size"),
            "lds": value("group_segment_fixed_size")}


def tensor_core_use(cubin: bytes) -> str:
    """"HGMMA x4, HMMA x8" or "no": tensor-core instructions in the SASS (bundled cuobjdump)."""
    cuobjdump = _nvidia_tool("cuobjdump")
    if cuobjdump is None:
        return "unknown"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    found = TENSOR_CORE_SASS.findall(sass)
    if not found:
        return "no"
    return ", ".join(f"{op} x{found.count(op)}" for op in sorted(set(found)))


def occupancy(target, regs: int, smem: int, num_warps: int) -> int:
    """Blocks per SM (CU) allowed by registers, shared memory (LDS), warps and the block limit."""
    if target.backend == "hip":
        per_lane = -(-max(regs, 1) // VGPR_GRANULE) * VGPR_GRANULE
        waves_per_simd = min(8, 512 // per_lane)
        by_regs = 4 * waves_per_simd // max(num_warps, 1)
        by_smem = target.smem_per_sm // smem if smem else target.max_blocks_per_sm
    else:
        regs_per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        by_regs = target.regs_per_sm // max(regs_per_warp * num_warps, 1)
        by_smem = target.smem_per_sm // (smem + RESERVED_SMEM_PER_BLOCK) if smem else target.max_blocks_per_sm
    by_warps = target.max_warps_per_sm // num_warps
    return max(0, min(by_regs, by_smem, by_warps, target.max_blocks_per_sm))


def compile_launch(launch: Launch, target, op: str = "", shapes: Optional[list[str]] = None) -> KernelReport:
    """Compiles one recorded launch for ``target`` and reads its resources; errors go into the report."""
    import triton
    from triton import knobs

    plan = launch.plan
    report = KernelReport(op=op, kernel=launch.name, target=target.name,
                          plan=", ".join(f"{k}={v}" for k, v in plan.constexprs.items()),
                          num_warps=plan.num_warps, num_stages=plan.num_stages, shapes=list(shapes or []),
                          smem_limit=target.smem_per_block)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        src, options = compile_source(launch, target)
        # Compile every time (a cache hit skips ptxas and its -v log) and capture the log triton prints.
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(src, target=target.gpu_target(), options=options)
    except Exception as e:  # reported per kernel; the exit status says it failed
        text = str(e).strip()
        report.error = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        report.compile_s = time.perf_counter() - start
        return report
    report.compile_s = time.perf_counter() - start
    if target.backend == "hip":
        stats = parse_amdgcn(compiled.asm["amdgcn"])
        stats["spill_loads"] = stats["spill_stores"]
        report.smem_bytes = max(int(compiled.metadata.shared), stats.pop("lds"))
        report.tensor_cores = "mfma" if "v_mfma" in compiled.asm["amdgcn"] else "no"
    else:
        stats = parse_ptxas_log(log.getvalue())
        if "regs" not in stats:
            report.error = "no ptxas -v log was captured (registers and spills unknown)"
            return report
        report.smem_bytes = int(compiled.metadata.shared) + stats.get("static_smem", 0)
        report.tensor_cores = tensor_core_use(compiled.asm["cubin"])
    report.regs = stats["regs"]
    report.spill_stores, report.spill_loads = stats.get("spill_stores", 0), stats.get("spill_loads", 0)
    report.stack_bytes = stats.get("stack_bytes", 0)
    report.ctas_per_sm = occupancy(target, report.regs, report.smem_bytes, plan.num_warps)
    report.ok = True
    return report


def record(target, run: Callable[[], None]) -> list[Launch]:
    """The launches ``run`` makes when planned for ``target``."""
    with recording(target) as launches:
        run()
    return launches


def distinct_launches(target, op_cases: dict[str, list[tuple[str, Callable[[], None]]]]):
    """``[(op, label, index, labels)]``: one entry per distinct compile among the launches of every case,
    located by the first case making it (``label``) and its position there (``index``), with the labels
    of every case that makes it."""
    seen: dict[str, tuple[str, str, int, list[str]]] = {}
    for op, op_list in op_cases.items():
        for label, run_case in op_list:
            for index, launch in enumerate(record(target, run_case)):
                entry = seen.setdefault(plan_key(launch, target), (op, label, index, []))
                if label not in entry[3]:
                    entry[3].append(label)
    return list(seen.values())


def _compile_job(job: tuple[str, str, str, int]) -> dict:
    """Worker entry: re-record case ``label`` of ``op`` for ``target`` and compile its launch ``index``."""
    target_name, op, label, index = job
    target = targets_mod.TARGETS[target_name]
    launch = record(target, dict(cases()[op])[label])[index]
    return asdict(compile_launch(launch, target, op))


def run(target_names: list[str], ops: Optional[list[str]] = None, quick: bool = False,
        jobs: int = 1) -> list[KernelReport]:
    """Compiles every distinct launch of the grid for every target: one report each."""
    op_cases = {op: lst for op, lst in cases(quick).items() if ops is None or op in ops}
    work = [((name, op, label, index), labels) for name in target_names
            for op, label, index, labels in distinct_launches(targets_mod.TARGETS[name], op_cases)]
    jobs_args = [w for w, _ in work]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_job, jobs_args))
    else:
        results = [_compile_job(w) for w in jobs_args]
    reports = []
    for result, (_, labels) in zip(results, work):
        report = KernelReport(**result)
        report.shapes = labels
        reports.append(report)
    return reports


def format_table(reports: list[KernelReport]) -> str:
    """A Markdown table, one row per kernel, plan and target."""
    head = ("| kernel | target | plan | warps/stages | regs | spill (st/ld B) | smem KiB (limit) | blocks/SM |"
            " tensor cores | shapes |")
    rows = [head, "|" + "---|" * 10]
    for r in reports:
        shapes = f"{len(r.shapes)}: {r.shapes[0]}{' ...' if len(r.shapes) > 1 else ''}" if r.shapes else ""
        if not r.ok:
            rows.append(f"| {r.kernel} | {r.target} | {r.plan} | {r.num_warps}/{r.num_stages} | FAILED: {r.error} "
                        f"||||| {shapes} |")
            continue
        flags = " **" + "; ".join(r.problems()) + "**" if r.problems() else ""
        rows.append(f"| {r.kernel} | {r.target} | {r.plan} | {r.num_warps}/{r.num_stages} | {r.regs} | "
                    f"{r.spill_stores}/{r.spill_loads} | {r.smem_bytes / 1024:.1f} ({r.smem_limit / 1024:.0f}) | "
                    f"{r.ctas_per_sm}{flags} | {r.tensor_cores} | {shapes} |")
    return "\n".join(rows)


def exit_status(reports: list[KernelReport]) -> int:
    """1 when nothing was checked or any row has a problem (see ``KernelReport.problems``), else 0."""
    return 1 if not reports or any(r.problems() for r in reports) else 0


def _rerun_without_interpreter(argv: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "c2f.kernels.inspect", *argv], env=env)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m c2f.kernels.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_TARGETS),
                        help=f"targets to compile for (default: all of {', '.join(DEFAULT_TARGETS)}); "
                             "'90' means sm_90")
    parser.add_argument("--op", nargs="+", default=None, choices=sorted(cases(quick=True)),
                        help="ops to check (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="production shapes only: N = 196, 1 and 16 heads, K = 4 and 32, fp32 and bf16")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--json", type=Path, default=None, help="also write one row per kernel, plan and target")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Kernels decorated under the interpreter cannot be compiled for a GPU: start clean.
        return _rerun_without_interpreter(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    names = [targets_mod.parse(a).name for a in args.arch]
    start = time.perf_counter()
    reports = run(names, args.op, args.quick, args.jobs)
    print(format_table(reports))
    for r in reports:
        for problem in r.problems():
            print(f"ERROR {r.kernel} on {r.target} ({r.plan}; shapes {', '.join(r.shapes)}): {problem}",
                  file=sys.stderr)
    print(f"{len(reports)} distinct compiles for {len(names)} targets in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"targets": names, "quick": args.quick,
                                         "kernels": [asdict(r) for r in reports]}, indent=1))
    return exit_status(reports)


if __name__ == "__main__":
    sys.exit(main())
