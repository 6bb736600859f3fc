"""What the GPU verdict writes: ``verdict.json`` (atomically, strict JSON), ``verdict.md`` (one table) and
the c2f commit it ran at. Used by ``bench.gpu_run.Run``; see ``bench/gpu.py`` for the command."""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "JSON_NAME", "MD_NAME", "write_json", "write_text", "report_header", "git", "markdown"]

ROOT = Path(__file__).resolve().parents[1]
JSON_NAME, MD_NAME = "verdict.json", "verdict.md"


def _strict(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: the file stays strict JSON for any reader."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as strict JSON, written atomically (``c2f.files.atomic_write``): never a partial file."""
    from c2f.files import atomic_write  # on use: c2f imports torch, which bench.gpu's environment precedes
    atomic_write(str(path), lambda f: json.dump(_strict(data), f, indent=1, default=str, allow_nan=False),
                 binary=False)


def write_text(path: Path, text: str) -> None:
    from c2f.files import atomic_write_text
    atomic_write_text(str(path), text)


def report_header(mode: str, device: dict[str, Any], args, shapes, argv: list[str]) -> dict[str, Any]:
    """The report's fields above its cases: the machine, the software, the c2f commit, the run's settings."""
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "schema": 1, "mode": mode, "device": device, "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(),
        "c2f": {"commit": commit, "dirty": bool(dirty) if dirty is not None else None, "root": str(ROOT)},
        "command": [sys.executable, "-m", "bench.gpu", *argv], "budget_s": args.budget,
        "elapsed_s": 0.0, "finished": False, "stopped": None,
        "shapes": vars(shapes) | {"N": shapes.N},
        "float32_matmul_precision": torch.get_float32_matmul_precision(), "threads": torch.get_num_threads(),
        "compile_backend": args.compile_backend, "yardsticks": None,
        "summary": {}, "cases": []}


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt(value: float | None, spec: str = ".3f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _phase_cell(phase: dict[str, Any] | None, ms: float | None) -> str:
    """A time in ms, or what kept the phase from giving one (error, skipped, not run)."""
    if ms is not None:
        return f"{ms:.3f}"
    if not phase:
        return "-"
    return {"error": "error", "interrupted": "interrupted"}.get(phase["status"], "-")


def _header(report: dict[str, Any]) -> list[str]:
    """The lines above the table: the machine and software, the run, and the peaks the fractions use."""
    dev, c2f = report["device"], report["c2f"]
    sheet = dev.get("datasheet")
    ys = report.get("yardsticks") or {}
    gemms = ", ".join(f"{name} {ys[f'gemm_{name}']['tflops']:.1f}" for name in ("fp32-ieee", "fp32-tf32", "bf16")
                      if "tflops" in ys.get(f"gemm_{name}", {}))
    measured = f"copy {ys['copy']['gbps']:.0f} GB/s; GEMM TFLOP/s {gemms}" if "gbps" in ys.get("copy", {}) else "-"
    stopped = "" if report["finished"] else f" (stopped: {report['stopped']})"
    lines = [f"# GPU verdict ({report['mode']})", "",
             f"- Device: {dev['label']}{' under the Triton interpreter' if dev.get('interpreter') else ''}; torch "
             f"{report['torch']}, triton {report['triton']}, Python {report['python']}; c2f "
             f"{c2f.get('commit') or '?'}{' (modified)' if c2f.get('dirty') else ''}.",
             f"- Shapes {report['shapes']}; budget {report['budget_s']:.0f} s, elapsed {report['elapsed_s']:.0f} s"
             f"{stopped}.",
             f"- Measured here: {measured}."]
    if sheet:
        lines.append(f"- Datasheet ({sheet['name']}, dense): {sheet['memory_gbps']:.0f} GB/s; TFLOP/s fp32 "
                     f"{sheet['fp32_tflops']}, tf32 {sheet['tf32_tflops']}, bf16 {sheet['bf16_tflops']}.")
    lines.append("- GB/s and TFLOP/s: bench.roofline's compulsory bytes and matmul FLOPs of one forward + backward "
                 f"over the fused median time, as % of the {'datasheet' if sheet else 'measured'} peak; roofline: "
                 "the time those bytes and FLOPs take at that peak, fused and reference.")
    return lines + [""]


def _row(c: dict[str, Any], source: str) -> str:
    """One case's table row; ``source``: the peaks its fractions and roofline times use."""
    mib = lambda b: _fmt(None if b is None else b / 2 ** 20, ".1f")  # noqa: E731
    pct = lambda x: _fmt(None if x is None else 100 * x, ".0f")  # noqa: E731
    check = c["status"] if c["status"] != "skipped" else f"skipped ({c['skipped']})"
    if c.get("error") and c["status"] != "failed":
        check += f": {c['error'][:120]}"
    err = "-" if c["max_rel_error"] is None else f"{c['max_rel_error']:.1e} ({c['bound_rel']:.1e})"
    model = c.get("model") or {}
    gbps = tflops = roof = "-"
    if model:
        gbps = f"{model['fused_gbps']:.0f} ({pct(model.get(f'fused_bandwidth_fraction_{source}'))}%)"
        tflops = f"{model['fused_tflops']:.2f} ({pct(model.get(f'fused_flops_fraction_{source}'))}%)"
        roof = " / ".join(_fmt(model.get(f"predicted_{impl}_ms_{source}")) for impl in ("fused", "reference"))
    phases = c["phases"]
    compiled = _phase_cell(phases.get("compile"), c["compiled_reference_ms"])
    if c["compiled_reference_ms"] is not None:
        compiled += f" ({c['compile_s']:.0f})"
    reference = _fmt(c["reference_ms"])
    reference_error = (phases.get("time") or {}).get("reference_error")
    if reference_error:
        reference = "out of memory" if reference_error.startswith("out of memory") else "error"
    speed = "-" if c["speedup"] is None else f"{c['speedup']:.2f}x"
    return (f"| {c['case']} | {c['precision']} | {check} | {err} | {_phase_cell(phases.get('time'), c['fused_ms'])} | "
            f"{reference} | {speed} | {compiled} | {mib(c['peak_fused_bytes'])} / {mib(c['peak_reference_bytes'])} | "
            f"{gbps} | {tflops} | {roof} |")


def markdown(report: dict[str, Any]) -> str:
    """The verdict as one markdown table, a row per case and precision, under the lines naming the machine."""
    source = "datasheet" if report["device"].get("datasheet") else "measured"
    lines = _header(report) + [
        "| case | precision | check | max rel error (bound) | fused ms | reference ms | speedup | "
        "compiled ref ms (compile s) | peak fused / ref MiB | fused GB/s (% peak) | fused TFLOP/s (% peak) | "
        "roofline fused / ref ms |", "|" + "---|" * 12]
    lines += [_row(c, source) for c in report["cases"]]
    s = report["summary"]
    lines += ["", f"{s['passed']} of {s['checked']} checked cases passed; {s['skipped']} skipped"
              + (f"; failed: {', '.join(s['failed'])}" if s["failed"] else "") + "."]
    return "\n".join(lines) + "\n"

