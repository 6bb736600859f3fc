"""Static GPU check: compile every kernel ahead of time for sm_80 / sm_90 and read its resources.

    python -m c2f.kernels.inspect --arch 80 90 [--json PATH] [--module part_attention ...]

No GPU is needed. Every module in ``kernels/`` with kernels exposes ``compile_specs()`` (see
``kernels.config.KernelSpec``); each spec is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` at its production block sizes, with the divisibility hints the
JIT would infer for the arguments the spec lists as ``aligned``. Per kernel and arch the table gives
registers per thread and spill bytes (from triton's own ptxas run, ``-v`` log), shared memory
(``metadata.shared``, the dynamic allocation, plus any static ``smem`` ptxas reports), whether the
SASS uses tensor-core instructions (``HMMA`` on sm_80, ``HGMMA`` = wgmma on sm_90, via the bundled
``cuobjdump -sass``; the PTX is scanned for ``mma``/``wgmma`` only when cuobjdump is missing), and
an occupancy bound (CTAs per SM allowed by registers, shared memory and warps).

Exit status 1 on a compile failure, a module without ``compile_specs``, or any spill.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

# Modules in kernels/ that hold no kernels.
NOT_KERNEL_MODULES = {"config", "inspect"}

# Per-SM limits used for the occupancy bound (CUDA occupancy calculator values).
SM_LIMITS = {
    80: {"regs": 65536, "smem": 164 * 1024, "warps": 64, "ctas": 32},   # A100
    90: {"regs": 65536, "smem": 228 * 1024, "warps": 64, "ctas": 32},   # H100
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256

TENSOR_CORE_SASS = re.compile(r"\b(HGMMA|HMMA|IMMA|UTCHMMA|UTCQMMA)\b")
TENSOR_CORE_PTX = re.compile(r"\b(wgmma\.mma_async|mma\.sync|tcgen05\.mma)\b")


@dataclass
class KernelReport:
    """One kernel compiled for one arch."""
    module: str
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    ok: bool = False
    regs: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_bytes: Optional[int] = None
    smem_bytes: Optional[int] = None
    tensor_cores: Optional[str] = None      # e.g. "HGMMA x16", "no"
    tensor_core_source: Optional[str] = None  # "sass" or "ptx"
    ctas_per_sm: Optional[int] = None
    compile_s: Optional[float] = None
    error: Optional[str] = None

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores) or bool(self.spill_loads)


def kernel_modules() -> list[str]:
    """Names of the kernel modules in this package (every module but config and inspect)."""
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)])
                  if m.name not in NOT_KERNEL_MODULES and not m.name.startswith("_"))


def load_specs(module_name: str) -> list:
    """Imports ``kernels.<module_name>`` and returns its ``compile_specs()``; raises when it has none."""
    module = importlib.import_module(f"{__package__}.{module_name}")
    compile_specs = getattr(module, "compile_specs", None)
    if compile_specs is None:
        raise AttributeError(f"kernels.{module_name} has no compile_specs(): every kernel module must list "
                             "its kernels at production block sizes (see kernels.config.KernelSpec)")
    specs = list(compile_specs())
    if not specs:
        raise ValueError(f"kernels.{module_name}.compile_specs() returned no specs")
    return specs


def _jit_function(fn: Any):
    import triton
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        if not hasattr(fn, "fn"):
            raise TypeError(f"spec.fn must be a @triton.jit function compiled without TRITON_INTERPRET=1, "
                            f"got {type(fn).__name__}")
        fn = fn.fn  # unwrap @triton.autotune / @triton.heuristics
    return fn


def _arg_names(fn: Any) -> list[str]:
    while not isinstance(fn, types.FunctionType):
        if not hasattr(fn, "fn"):
            raise TypeError(f"spec.fn must be a @triton.jit function, got {type(fn).__name__}")
        fn = fn.fn  # JITFunction, InterpretedFunction, @triton.autotune / @triton.heuristics wrappers
    return list(fn.__code__.co_varnames[:fn.__code__.co_argcount])


def compile_signature(spec) -> tuple[dict[str, str], dict]:
    """(signature in argument order with constexprs marked, divisibility attrs) for ``ASTSource``."""
    names = _arg_names(spec.fn)
    unknown = (set(spec.signature) | set(spec.constexprs) | set(spec.aligned)) - set(names)
    if unknown:
        raise ValueError(f"{spec.name}: names not among the kernel's arguments {names}: {sorted(unknown)}")
    signature = {}
    for name in names:
        if name in spec.constexprs:
            signature[name] = "constexpr"
        elif name in spec.signature:
            signature[name] = spec.signature[name]
        else:
            raise ValueError(f"{spec.name}: argument {name!r} has neither a type in signature nor a constexpr value")
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
    return signature, attrs


def ast_source(spec):
    """The ``ASTSource`` for a spec: signature in argument order, constexprs, divisibility hints."""
    from triton.compiler import ASTSource

    signature, attrs = compile_signature(spec)
    return ASTSource(fn=_jit_function(spec.fn), signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)


def _nvidia_tool(name: str) -> Optional[str]:
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    return shutil.which(name)


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


def tensor_core_use(cubin: bytes, ptx: str) -> tuple[str, str]:
    """("HGMMA x4, HMMA x8" or "no", "sass"|"ptx"): tensor-core instructions in the SASS, else in the PTX."""
    cuobjdump = _nvidia_tool("cuobjdump")
    if cuobjdump is not None:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        found = TENSOR_CORE_SASS.findall(sass)
        source = "sass"
    else:
        found = TENSOR_CORE_PTX.findall(ptx)
        source = "ptx"
    if not found:
        return "no", source
    counts = {op: found.count(op) for op in sorted(set(found))}
    return ", ".join(f"{op} x{n}" for op, n in counts.items()), source


def occupancy(arch: int, regs: int, smem: int, num_warps: int) -> int:
    """CTAs per SM allowed by registers, shared memory, warps and the CTA limit (the smallest wins)."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = lim["regs"] // max(regs_per_warp * num_warps, 1)
    by_smem = lim["smem"] // smem if smem else lim["ctas"]
    by_warps = lim["warps"] // num_warps
    return max(0, min(by_regs, by_smem, by_warps, lim["ctas"]))


def inspect_spec(spec, arch: int, module: str = "") -> KernelReport:
    """Compiles one spec for one arch and reads its resources; compile errors go into ``error``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    report = KernelReport(module=module, kernel=spec.name, arch=arch, num_warps=spec.num_warps,
                          num_stages=spec.num_stages)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        src = ast_source(spec)
        # Compile every time (a cache hit skips ptxas and its log) and capture the -v log triton prints.
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as e:  # reported per kernel; the command's exit status says it failed
        report.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        report.compile_s = time.perf_counter() - start
        return report
    report.compile_s = time.perf_counter() - start
    stats = parse_ptxas_log(log.getvalue())
    if "regs" not in stats:
        report.error = "no ptxas -v log was captured (registers and spills unknown)"
        return report
    report.regs = stats["regs"]
    report.spill_stores = stats.get("spill_stores", 0)
    report.spill_loads = stats.get("spill_loads", 0)
    report.stack_bytes = stats.get("stack_bytes", 0)
    report.smem_bytes = int(compiled.metadata.shared) + stats.get("static_smem", 0)
    report.tensor_cores, report.tensor_core_source = tensor_core_use(compiled.asm["cubin"], compiled.asm["ptx"])
    report.ctas_per_sm = occupancy(arch, report.regs, report.smem_bytes, spec.num_warps)
    report.ok = True
    return report


def run(modules: list[str], arches: list[int]) -> tuple[list[KernelReport], list[str]]:
    """Compiles every spec of every module for every arch: (reports, module-level errors)."""
    reports, errors = [], []
    for module in modules:
        try:
            specs = load_specs(module)
        except Exception as e:
            errors.append(f"kernels.{module}: {type(e).__name__}: {e}")
            continue
        for spec in specs:
            for arch in arches:
                reports.append(inspect_spec(spec, arch, module))
    return reports, errors


def format_table(reports: list[KernelReport]) -> str:
    """A Markdown table: kernel, arch, warps/stages, registers, spill bytes, shared memory, tensor cores."""
    head = ("| kernel | arch | warps/stages | regs | spill bytes (st/ld) | smem (KiB) | CTAs/SM | tensor cores |"
            " compile (s) |")
    rows = [head, "|" + "---|" * 9]
    for r in reports:
        if not r.ok:
            rows.append(f"| {r.kernel} | sm_{r.arch} | {r.num_warps}/{r.num_stages} | FAILED: {r.error} ||||||")
            continue
        spill = f"{r.spill_stores}/{r.spill_loads}" + (" **SPILL**" if r.spills else "")
        tc = r.tensor_cores + (" (ptx)" if r.tensor_core_source == "ptx" else "")
        rows.append(f"| {r.kernel} | sm_{r.arch} | {r.num_warps}/{r.num_stages} | {r.regs} | {spill} | "
                    f"{r.smem_bytes / 1024:.1f} | {r.ctas_per_sm} | {tc} | {r.compile_s:.1f} |")
    return "\n".join(rows)


def _rerun_without_interpreter(argv: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "c2f.kernels.inspect", *argv], env=env)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m c2f.kernels.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SM_LIMITS))
    parser.add_argument("--module", nargs="+", default=None, help="kernel modules to check (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Kernels decorated under the interpreter cannot be compiled for a GPU: start clean.
        return _rerun_without_interpreter(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    modules = args.module or kernel_modules()
    reports, errors = run(modules, args.arch)
    print(format_table(reports))
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    failed = [r for r in reports if not r.ok]
    spilled = [r for r in reports if r.ok and r.spills]
    for r in failed:
        print(f"ERROR {r.module}.{r.kernel} sm_{r.arch}: {r.error}", file=sys.stderr)
    for r in spilled:
        print(f"ERROR {r.module}.{r.kernel} sm_{r.arch} spills {r.spill_stores} B stores / {r.spill_loads} B loads",
              file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"modules": modules, "arches": args.arch, "errors": errors,
                                         "kernels": [asdict(r) for r in reports]}, indent=1))
    if not modules:
        print("ERROR no kernel modules found in kernels/", file=sys.stderr)
    return exit_status(modules, reports, errors)


def exit_status(modules: list[str], reports: list[KernelReport], errors: list[str]) -> int:
    """1 when there is no module, a module-level error, a failed compile or any spill; else 0."""
    if not modules or errors:
        return 1
    return 1 if any(not r.ok or r.spills for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
