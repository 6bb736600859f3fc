"""Static GPU check: compile the launchers' own plans ahead of time for every target, read the resources.

    python -m c2f.kernels.inspect [--arch sm_80 sm_90 gfx942 ...] [--op part_attention ...] [--json PATH]
                                  [--quick] [--jobs N]

No GPU is needed. Every case of the shape grid (``inspect_cases.cases()``: tokens N in {49, 196, 324,
576, 1024}, heads {1, 3, 16}, fp32/bf16/fp16 maps with TF32 dots and bf16/fp16 maps with bf16/fp16
operands (the autocast precisions), forward with and without the token statistics given, backward with
and without dattn and dx; every mixup kernel at K in {1, 4, 32} views, fp32/bf16/fp16; the head likewise
at K in {1, 4}) calls the real
launchers on ``meta`` tensors inside ``launch.recording(target)``: the launches they would make are
recorded, with their plans for that target, and compiled with ``triton.compile`` exactly as the JIT
would (the argument types and divisibility come from the same arguments). Launches that compile to the
same kernel are compiled once and reported with every shape that maps to them.

Results are kept per compile in ``~/.cache/c2f/inspect`` (``$C2F_INSPECT_CACHE`` moves it; ``off``, or
``--no-cache``, turns it off), under Triton's own cache key (the kernel's source and the sources of the
functions it calls, the argument specialisation, constexprs, options, target, Triton's build and the
environment variables that change code generation). A run after an edit recompiles the kernels of the
edited files and of every kernel that calls into them (Triton's key holds the sources of a kernel's callees
and each kernel's line number); the code here that reads the figures is part of the key too. Occupancy and
the pass/fail verdict are recomputed from the target table every run.

Per kernel, plan and target: registers, spills, shared memory (LDS on AMD) against the target's
per-block limit (``targets.TARGETS``) and against the plan's own bound (``KernelPlan.smem_bound``),
tensor-core use (from the PTX; MFMA on AMD) and an occupancy bound. The
command exits 1 on a compile error, a spill, shared memory over the limit or the plan's bound, or zero
occupancy.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import targets as targets_mod
from .inspect_cache import CACHE_ENV, COMPILED_FIELDS, cache_dir, cache_read, cache_write, compile_key
from .inspect_cases import cases
from .launch import MIN_TRITON, Launch, recording, version_tuple

PTX_TENSOR_CORE = {"HMMA": r"\bmma\.sync\.", "HGMMA": r"\bwgmma\.mma_async\.", "UTCHMMA": r"\btcgen05\.mma\."}
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
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    sgpr_spills: int | None = None   # AMD: SGPRs spilled to VGPR lanes (no memory traffic; see parse_amdgcn)
    smem_bytes: int | None = None
    smem_limit: int | None = None
    smem_bound: int | None = None   # the plan's own bound (plans.py); the compiled figure must not exceed it
    tensor_cores: str | None = None
    ctas_per_sm: int | None = None
    compile_s: float | None = None
    cached: bool = False                # read from the result cache (compile_s: the original compile's)
    error: str | None = None

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
        elif self.stack_bytes:
            out.append(f"{self.stack_bytes} B of stack (local / scratch memory)")
        if self.smem_bytes is not None and self.smem_limit is not None and self.smem_bytes > self.smem_limit:
            out.append(f"shared memory {self.smem_bytes / 1024:.1f} KiB over the {self.smem_limit / 1024:.0f} KiB "
                       "per-block limit")
        if self.smem_bytes is not None and self.smem_bound is not None and self.smem_bytes > self.smem_bound:
            out.append(f"shared memory {self.smem_bytes / 1024:.1f} KiB over the plan's own bound "
                       f"{self.smem_bound / 1024:.1f} KiB (plans.py: the rule that picked the tiles is wrong)")
        if self.ctas_per_sm == 0:
            out.append("zero occupancy (no block fits an SM)")
        return out


# ----------------------------------------------------------------------------------------- compiling

def _jit_function(kernel):
    from triton.runtime.jit import JITFunction
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{kernel!r} is not a compiled-mode @triton.jit function (was TRITON_INTERPRET=1 set?)")
    return kernel


COMPILATION_KNOBS = ("instrumentation_mode", "fpsan_homomorphic_casts")


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
                  num_stages=launch.plan.num_stages, **launch.plan.options, debug=False)
    # The compilation knobs a launch passes to the binder, as JITFunction.run does: Triton 3.6 has
    # instrumentation_mode only, 3.9 adds fpsan_homomorphic_casts.
    for knob in COMPILATION_KNOBS:
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def plan_key(launch: Launch, target) -> str:
    """What makes two launches the same compiled kernel: kernel, argument types, constexprs, options."""
    src, options = compile_source(launch, target)
    consts = ", ".join(f"{k}={v}" for k, v in sorted(launch.plan.constexprs.items()))
    sig = " ".join(f"{k}:{v}" for k, v in src.signature.items() if v != "constexpr")
    aligned = sorted(k for k, v in src.attrs.items() if v)
    extra = "".join(f" {k}={options.get(k)}" for k in sorted(launch.plan.options))
    return f"{launch.name} [{consts}] w{options['num_warps']} s{options['num_stages']}{extra} {sig} aligned {aligned}"


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
    """Resource metadata of an AMD kernel from its amdgcn text: VGPRs (+AGPRs), VGPR spills, SGPR spills,
    scratch (private segment) bytes, LDS bytes. SGPR spills go to lanes of spare VGPRs (``v_writelane``)
    and cost no memory; they count as spills only when the kernel also needs scratch memory."""
    def value(key: str) -> int:
        m = re.search(rf"\.{key}:\s+(\d+)", asm)
        return int(m.group(1)) if m else 0
    return {"regs": value("vgpr_count") + value("agpr_count"), "spill_stores": value("vgpr_spill_count"),
            "sgpr_spills": value("sgpr_spill_count"), "stack_bytes": value("private_segment_fixed_size"),
            "lds": value("group_segment_fixed_size")}


def tensor_core_use(ptx: str) -> str:
    """"HMMA x12" (``mma.sync``), "HGMMA x4" (``wgmma``), "UTCHMMA x2" (``tcgen05.mma``) or "no": the
    tensor-core instructions of the PTX, named by the SASS instruction each one becomes. Read from the
    PTX rather than disassembled from the cubin: the same answer without a ``cuobjdump`` per kernel
    (a second per compile, a third of the whole grid's time)."""
    found = [name for name, pattern in PTX_TENSOR_CORE.items() for _ in re.finditer(pattern, ptx)]
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


def compile_launch(launch: Launch, target, op: str = "", shapes: list[str] | None = None) -> KernelReport:
    """Compiles one recorded launch for ``target`` and reads its resources; errors go into the report."""
    import triton
    from triton import knobs

    plan = launch.plan
    report = KernelReport(op=op, kernel=launch.name, target=target.name,
                          plan=", ".join(f"{k}={v}" for k, v in plan.constexprs.items()),
                          num_warps=plan.num_warps, num_stages=plan.num_stages, shapes=list(shapes or []),
                          smem_limit=target.smem_per_block, smem_bound=plan.smem_bound)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        src, options = compile_source(launch, target)
        key = compile_key(src, options, target, _derivation())
        if (entry := cache_read(key)) is not None:
            return _finish(report, target, entry, cached=True)
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
    entry = dict(compile_s=time.perf_counter() - start, sgpr_spills=None)
    if target.backend == "hip":
        stats = parse_amdgcn(compiled.asm["amdgcn"])
        entry["sgpr_spills"] = stats.pop("sgpr_spills")
        if stats["stack_bytes"]:     # scratch memory: SGPR spills that did not fit in VGPR lanes, or VGPR spills
            stats["spill_stores"] += entry["sgpr_spills"]
        stats["spill_loads"] = stats["spill_stores"]
        entry["smem_bytes"] = max(int(compiled.metadata.shared), stats.pop("lds"))
        entry["tensor_cores"] = "mfma" if "v_mfma" in compiled.asm["amdgcn"] else "no"
    else:
        stats = parse_ptxas_log(log.getvalue())
        if "regs" not in stats:
            report.error = "no ptxas -v log was captured (registers and spills unknown)"
            report.compile_s = entry["compile_s"]
            return report
        entry["smem_bytes"] = int(compiled.metadata.shared) + stats.get("static_smem", 0)
        entry["tensor_cores"] = tensor_core_use(compiled.asm["ptx"])
    entry.update(regs=stats["regs"], spill_stores=stats.get("spill_stores", 0),
                 spill_loads=stats.get("spill_loads", 0), stack_bytes=stats.get("stack_bytes", 0))
    cache_write(key, entry)
    return _finish(report, target, entry, cached=False)


@functools.lru_cache(maxsize=1)
def _derivation() -> str:
    """A digest of the code that reads a compile's figures: editing it retires the cached entries."""
    import inspect as pyinspect
    code = "".join(pyinspect.getsource(f) for f in (parse_ptxas_log, parse_amdgcn, tensor_core_use, compile_launch))
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def _finish(report: KernelReport, target, entry: dict, cached: bool) -> KernelReport:
    """The report from a compile's figures; occupancy from the target table as it is now."""
    for name in COMPILED_FIELDS:
        setattr(report, name, entry[name])
    report.cached = cached
    report.ctas_per_sm = occupancy(target, report.regs, report.smem_bytes, report.num_warps)
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


@functools.lru_cache(maxsize=64)
def _recorded(target_name: str, op: str, label: str) -> list[Launch]:
    """The launches of one case, recorded once per worker (a case's launches are compiled by neighbouring jobs)."""
    return record(targets_mod.TARGETS[target_name], dict(cases()[op])[label])


def _compile_job(job: tuple[str, str, str, int]) -> dict:
    """Worker entry: re-record case ``label`` of ``op`` for ``target`` and compile its launch ``index``."""
    target_name, op, label, index = job
    return asdict(compile_launch(_recorded(target_name, op, label)[index], targets_mod.TARGETS[target_name], op))


def run(target_names: list[str], ops: list[str] | None = None, quick: bool = False,
        jobs: int = 1) -> list[KernelReport]:
    """Compiles every distinct launch of the grid for every target: one report each. With ``jobs`` > 1
    the compiles of a target start while the next target's launches are still being recorded."""
    op_cases = {op: lst for op, lst in cases(quick).items() if ops is None or op in ops}
    pool = ProcessPoolExecutor(jobs) if jobs > 1 else None
    pending = []
    try:
        for name in target_names:
            for op, label, index, labels in distinct_launches(targets_mod.TARGETS[name], op_cases):
                job = (name, op, label, index)
                pending.append((pool.submit(_compile_job, job) if pool else job, labels))
        reports = []
        for job, labels in pending:
            report = KernelReport(**(job.result() if pool else _compile_job(job)))
            report.shapes = labels
            reports.append(report)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
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
        sgpr = f" (+{r.sgpr_spills} SGPR to VGPR lanes)" if r.sgpr_spills else ""
        rows.append(f"| {r.kernel} | {r.target} | {r.plan} | {r.num_warps}/{r.num_stages} | {r.regs} | "
                    f"{r.spill_stores}/{r.spill_loads}{sgpr} | {r.smem_bytes / 1024:.1f} ({r.smem_limit / 1024:.0f}) | "
                    f"{r.ctas_per_sm}{flags} | {r.tensor_cores} | {shapes} |")
    return "\n".join(rows)


def exit_status(reports: list[KernelReport]) -> int:
    """1 when nothing was checked or any row has a problem (see ``KernelReport.problems``), else 0."""
    return 1 if not reports or any(r.problems() for r in reports) else 0


def _rerun_without_interpreter(argv: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "c2f.kernels.inspect", *argv], env=env)


def unsupported_triton(version: str | None = None) -> str | None:
    """One line naming the Triton this tool needs, or None where the installed one will do. It drives Triton's
    compiler through internals (the JIT's binder, ``_pack_args``, ``knobs``, ``get_cache_key``) as of 3.6."""
    if version is None:
        import triton
        version = triton.__version__
    if version_tuple(version) < MIN_TRITON:
        return (f"c2f.kernels.inspect needs Triton >= {'.'.join(map(str, MIN_TRITON))} (Triton {version} is "
                f"installed): the offline compile uses Triton's compiler internals as of that release")
    return None


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--no-cache", action="store_true",
                        help=f"compile everything, ignoring and not writing the result cache (${CACHE_ENV}=off)")
    args = parser.parse_args(argv)
    if (problem := unsupported_triton()) is not None:
        print(problem, file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Kernels decorated under the interpreter cannot be compiled for a GPU: start clean.
        return _rerun_without_interpreter(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.no_cache:
        os.environ[CACHE_ENV] = "off"   # before the workers start: they read it
    names = [targets_mod.parse(a).name for a in args.arch]
    start = time.perf_counter()
    reports = run(names, args.op, args.quick, args.jobs)
    print(format_table(reports))
    for r in reports:
        for problem in r.problems():
            print(f"ERROR {r.kernel} on {r.target} ({r.plan}; shapes {', '.join(r.shapes)}): {problem}",
                  file=sys.stderr)
    cached = sum(r.cached for r in reports)
    where = f" in {cache_dir()}; --no-cache compiles all" if cached else ""
    print(f"{len(reports)} distinct compiles for {len(names)} targets in {time.perf_counter() - start:.0f} s "
          f"({len(reports) - cached} compiled, {cached} from the cache{where})", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"targets": names, "quick": args.quick,
                                         "kernels": [asdict(r) for r in reports]}, indent=1))
    return exit_status(reports)


if __name__ == "__main__":
    sys.exit(main())
