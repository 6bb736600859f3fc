"""One GPU verdict run: the cases, the budget, the report, and the phases that fill it (``bench/gpu.py``
says what the command does; ``bench.gpu_cases`` holds the cases, ``bench.gpu_report`` what is written)."""
from __future__ import annotations

import argparse
import fnmatch
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .gpu_report import JSON_NAME, MD_NAME, markdown, report_header, write_json, write_text

__all__ = ["Run", "PHASES"]

PHASES = ("check", "time", "compile")
# Seconds a phase's case is assumed to take before any has run: a GPU case's check compiles its kernels
# (a second or two each); a compile case is Inductor's forward and backward graphs.
PRIOR_S = {"gpu": {"check": 20.0, "time": 8.0, "compile": 90.0},
           "smoke": {"check": 2.0, "time": 2.0, "compile": 3.0}}
# Timing: seconds of timed calls aimed at per implementation, and the bounds on the number of repeats.
TIMED_S = {"gpu": 1.0}
REPEATS = {"gpu": (5, 50), "smoke": (2, 2)}
WARMUP = {"gpu": 1, "smoke": 0}          # untimed calls right before the repeats (after the peak's call)
# Order of the timing and compile phases: the default precision first.
TIME_ORDER = ("fp32-tf32", "bf16", "fp32-ieee")
# What a smoke run times and compiles. The interpreter multiplies fp32 exactly whatever the dot precision
# says, so its fp32-ieee and fp32-tf32 steps are one computation: timed once, as fp32-tf32; one precision
# goes through torch.compile (the path, not every graph).
SMOKE_PHASES = {"time": ("fp32-tf32", "bf16"), "compile": ("fp32-tf32",)}
SMOKE_REASON = {"time": "smoke: under the interpreter fp32-ieee is fp32-tf32's computation, timed there",
                "compile": "smoke: one precision is compiled"}


def _log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)



def _error_text(e: BaseException) -> str:
    """One line: the exception, its message and where it was raised (where its cause was, when re-raised)."""
    tb = traceback.extract_tb((e.__cause__ or e).__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {str(e).strip()[:1500]}{where}"



class Run:
    """One verdict run: the cases, the budget, the report, and the phases that fill it."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        import torch

        from . import gpu_cases, gpu_check, gpu_device
        self.torch, self.cases_mod, self.checks, self.dev = torch, gpu_cases, gpu_check, gpu_device
        self.args = args
        self.start = getattr(args, "started", None) or time.perf_counter()
        self.deadline = self.start + args.budget
        self.mode = "smoke" if args.smoke else "gpu"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.shapes = gpu_cases.SMOKE if args.smoke else gpu_cases.PRODUCTION
        self.out = Path(args.out)
        self.lock = threading.Lock()
        self.ratios: dict[str, list[float]] = {p: [] for p in PHASES}
        self.current: tuple[str, dict[str, Any]] | None = None
        self.entries = self._entries()
        self.report = self._report_header(argv)

    # ------------------------------------------------------------------------------------ the report
    def _entries(self) -> list[dict[str, Any]]:
        cm = self.cases_mod
        wanted = lambda name, pats: not pats or any(fnmatch.fnmatchcase(name, p) for p in pats)  # noqa: E731
        entries = []
        for prec in cm.PRECISIONS:
            if not wanted(prec.name, self.args.precision):
                continue
            for case in cm.CASES:
                if not wanted(case.name, self.args.case):
                    continue
                atol, source = cm.tolerance(case, prec)
                entries.append({
                    "id": f"{case.name}/{prec.name}", "case": case.name, "op": case.op, "precision": prec.name,
                    **cm.labels(case, prec), "heads": case.heads, "views": case.views, "x_grad": case.x_grad,
                    "options": dict(case.options), "plan": dict(case.plan),
                    "status": "pending", "passed": None, "error": None, "skipped": None,
                    "max_rel_error": None, "bound_rel": None, "bound_use": None, "worst": None, "atol_rel": atol,
                    "tolerance_source": source,
                    "fused_ms": None, "reference_ms": None, "speedup": None,
                    "compiled_reference_ms": None, "compile_s": None, "speedup_vs_compiled_reference": None,
                    "peak_fused_bytes": None, "peak_reference_bytes": None, "peak_compiled_reference_bytes": None,
                    "peak_ratio": None, "peak_fused_total_bytes": None, "peak_reference_total_bytes": None,
                    "peak_method": None, "shapes": None, "model": None, "timing": {}, "checks": [],
                    "fused_ops": {}, "phases": {}, "_case": case, "_precision": prec})
        return entries

    def _report_header(self, argv: list[str]) -> dict[str, Any]:
        from c2f.kernels.launch import interpreting
        return report_header(self.mode, self.dev.describe(self.device, interpreting()), self.args, self.shapes, argv)

    def snapshot(self) -> dict[str, Any]:
        report = dict(self.report)
        report["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        report["cases"] = [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.entries]
        ran = [e for e in self.entries if e["passed"] is not None]
        report["summary"] = {
            "cases": len(self.entries), "checked": len(ran), "passed": sum(e["passed"] is True for e in ran),
            "failed": [e["id"] for e in ran if e["passed"] is False],
            "skipped": sum(e["status"] == "skipped" for e in self.entries)}
        return report

    def save(self) -> None:
        with self.lock:
            write_json(self.out / JSON_NAME, self.snapshot())

    # ------------------------------------------------------------------------------------ the budget
    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def estimate(self, phase: str) -> float:
        prior = PRIOR_S[self.mode][phase]
        seen = self.ratios[phase]
        return prior * (statistics.median(seen) if seen else 1.0)

    def _fits(self, entry: dict[str, Any], phase: str) -> bool:
        need = self.estimate(phase)
        if self.remaining() >= need:
            return True
        reason = f"budget: {max(self.remaining(), 0.0):.0f} s left, the {phase} phase's case needs about {need:.0f} s"
        entry["phases"][phase] = {"status": "skipped", "reason": reason}
        if phase == "check":
            entry["status"], entry["skipped"] = "skipped", reason
        self._log(f"skip {phase} {entry['id']}: {reason}")
        return False

    def _log(self, message: str) -> None:
        _log(message, self.start)

    # ------------------------------------------------------------------------------------ the phases
    def tasks(self) -> list[tuple[str, dict[str, Any]]]:
        """(phase, entry) in running order: every check (fp32-ieee, then fp32-tf32, then bf16), then the
        timings, then the compiles (``TIME_ORDER``; a smoke run's share of them: ``SMOKE_PHASES``)."""
        by_prec = lambda name: [e for e in self.entries if e["precision"] == name]  # noqa: E731
        tasks = [("check", e) for p in ("fp32-ieee", "fp32-tf32", "bf16") for e in by_prec(p)]
        for phase in ("time", "compile"):
            if phase == "compile" and self.args.no_compile:
                continue
            for p in TIME_ORDER:
                interpreted = self.report["device"]["interpreter"]
                if self.args.smoke and (phase == "compile" or interpreted) and p not in SMOKE_PHASES[phase]:
                    for e in by_prec(p):
                        e["phases"][phase] = {"status": "skipped", "reason": SMOKE_REASON[phase]}
                    continue
                tasks += [(phase, e) for e in by_prec(p)]
        return tasks

    def run(self) -> int:
        self._log(f"{self.report['device']['label']}; torch {self.report['torch']}, triton {self.report['triton']}; "
                  f"budget {self.args.budget:.0f} s; {len(self.entries)} cases x {len(PHASES)} phases")
        self.save()
        self.report["yardsticks"] = self._yardsticks()
        self.save()
        for phase, entry in self.tasks():
            if not self._ready(phase, entry) or not self._fits(entry, phase):
                self.save()
                continue
            began = time.perf_counter()
            self.current = (phase, entry)
            self._run_phase(phase, entry)
            self.current = None
            took = time.perf_counter() - began
            entry["phases"][phase]["seconds"] = round(took, 2)
            self.ratios[phase].append(took / PRIOR_S[self.mode][phase])
            self.save()
        return self.finish(None)

    def _ready(self, phase: str, entry: dict[str, Any]) -> bool:
        """Time and compile a case only once its check ran without raising (a wrong value is still timed)."""
        if phase == "check":
            return True
        check = entry["phases"].get("check", {})
        if check.get("status") in ("passed", "failed"):
            return True
        entry["phases"][phase] = {"status": "skipped", "reason": f"check {check.get('status', 'not run')}"}
        return False

    def _yardsticks(self) -> dict[str, Any]:
        began = time.perf_counter()
        measured = self.dev.yardsticks(self.device, small=self.args.smoke)
        measured["seconds"] = round(time.perf_counter() - began, 2)
        summary = ", ".join(f"{k} {v['tflops']:.1f} TFLOP/s" for k, v in measured.items()
                            if isinstance(v, dict) and "tflops" in v)
        copy = measured.get("copy", {})
        self._log(f"yardsticks: copy {copy.get('gbps', float('nan')):.0f} GB/s, {summary}")
        return measured

    def _run_phase(self, phase: str, entry: dict[str, Any]) -> None:
        result: dict[str, Any] = {"status": "error"}
        entry["phases"][phase] = result
        bundle = None
        try:
            bundle = self.cases_mod.bundle(entry["_case"], entry["_precision"], self.shapes, self.device,
                                           self.args.compile_backend)
            entry["shapes"] = bundle.input_shapes()
            {"check": self._check, "time": self._time, "compile": self._compile}[phase](entry, bundle, result)
        except Exception as e:  # noqa: BLE001  (one case's failure is recorded; the others go on)
            oom = self.dev.is_oom(e)
            result.update(status="error", error=("out of memory: " if oom else "") + _error_text(e), oom=oom)
            if phase == "check":
                entry.update(status="error", passed=False, error=result["error"])
            elif phase == "time" and result.get("impl") == "fused":
                entry.update(status="error", passed=False, error=result["error"])
        finally:
            del bundle
            self.dev.free_memory(self.device)
        self._log(f"{phase:7s} {entry['id']}: {self._summary(phase, entry, result)}")

    @staticmethod
    def _summary(phase: str, entry: dict[str, Any], result: dict[str, Any]) -> str:
        if result.get("status") == "error":
            return result["error"].splitlines()[0][:300]
        if phase == "check":
            return (f"{result['status']} (max rel error {entry['max_rel_error']:.2e}, worst {entry['worst']}, "
                    f"bound {entry['bound_rel']:.2e})")
        if phase == "time":
            ref = entry["reference_ms"]
            return (f"fused {entry['fused_ms']:.3f} ms, reference "
                    + (f"{ref:.3f} ms ({entry['speedup']:.2f}x)" if ref else "n/a"))
        return f"compiled reference {entry['compiled_reference_ms']:.3f} ms after {entry['compile_s']:.1f} s"

    # -- check
    def _check(self, entry: dict[str, Any], bundle, result: dict[str, Any]) -> None:
        verdict = self.checks.check(bundle)
        entry.update(passed=verdict["passed"], status="passed" if verdict["passed"] else "failed",
                     max_rel_error=verdict["max_rel_error"], bound_rel=verdict["bound_rel"], worst=verdict["worst"],
                     bound_use=verdict["bound_use"], checks=verdict["checks"], fused_ops=verdict["fused_ops"])
        if not verdict["passed"]:
            bad = [r["tensor"] for r in verdict["checks"] if not r["passed"]]
            entry["error"] = f"out of tolerance: {', '.join(bad)}"
        result["status"] = entry["status"]

    # -- time
    def _call(self, step) -> float:
        """Wall seconds of one call of the step (setup excluded, synchronised): a warm-up, or a compile."""
        step.setup()
        began = time.perf_counter()
        step.run()
        self.dev.synchronize(self.device)
        return time.perf_counter() - began

    def _measure(self, bundle, impl: str, matmul: str, first_call: bool = False) -> dict[str, Any]:
        """Peak memory of one step and the median of timed repeats. ``first_call``: the first call is timed
        alone (a compile). On a GPU one warm-up call sizes the repeats (about ``TIMED_S`` of timed calls)
        and precedes the peak's call, so one-time allocations (cuBLAS workspaces) stay out of the peak; the
        interpreter needs no warm-up, so in a smoke run the peak's call is the only one before the repeats."""
        dev = self.dev
        step = bundle.step(impl)
        out: dict[str, Any] = {}
        low, high = REPEATS[self.mode]
        repeats = low
        with dev.matmul_precision(matmul, self.device):
            if first_call:
                out["compile_s"] = self._call(step)
            if self.mode == "gpu":
                repeats = int(min(high, max(low, TIMED_S[self.mode] / max(self._call(step), 1e-6))))
            peak = dev.peak_bytes(step.setup, step.run, self.device)
            times = dev.time_step(step.setup, step.run, self.device, warmup=WARMUP[self.mode], repeats=repeats)
        del step
        out.update(ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
                   repeats=repeats, peak_bytes=peak["bytes"], peak_total_bytes=peak["total"],
                   peak_method=peak["method"], timer="cuda events" if self.device.type == "cuda" else "perf_counter")
        dev.free_memory(self.device)
        return out

    def _attempt(self, fn) -> tuple[Any, str | None]:
        """``(fn(), None)``, or ``(None, error text)`` with the device's memory freed after an error."""
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001  (a reference that fails, e.g. out of memory, is a finding)
            error = ("out of memory: " if self.dev.is_oom(e) else "") + _error_text(e)
        self.dev.free_memory(self.device)      # outside the handler: the traceback no longer holds tensors
        return None, error

    def _time(self, entry: dict[str, Any], bundle, result: dict[str, Any]) -> None:
        matmul = entry["_precision"].matmul
        result["impl"] = "fused"
        fused = self._measure(bundle, "fused", matmul)          # an error here fails the case
        reference, error = self._attempt(lambda: self._measure(bundle, "reference", matmul))
        result.pop("impl")
        if error:
            result["reference_error"] = error
        for impl, m in (("fused", fused), ("reference", reference)):
            if m is None:
                continue
            entry["timing"][impl] = m
            entry[f"{impl}_ms"], entry[f"peak_{impl}_bytes"] = m["ms"], m["peak_bytes"]
            entry[f"peak_{impl}_total_bytes"], entry["peak_method"] = m["peak_total_bytes"], m["peak_method"]
        if entry["reference_ms"]:
            entry["speedup"] = entry["reference_ms"] / entry["fused_ms"]
        if entry["peak_fused_bytes"] and entry["peak_reference_bytes"]:
            entry["peak_ratio"] = entry["peak_fused_bytes"] / entry["peak_reference_bytes"]
        entry["model"] = self._model(entry)
        result["status"] = "done"

    def _model(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The bytes model's figures of the case beside what it achieved: GB/s and TFLOP/s of the fused step
        (compulsory bytes and matmul FLOPs over its median time) as fractions of the datasheet peaks and of
        the measured yardsticks, and the roofline time each set of peaks predicts for fused and reference."""
        costs = self.cases_mod.model_costs(entry["_case"], entry["_precision"], self.shapes)
        peaks = {}
        sheet = self.report["device"].get("datasheet")
        field = self.dev.PEAK_FIELD[entry["precision"]]
        if sheet:
            peaks["datasheet"] = (sheet["memory_gbps"] * 1e9, sheet[field] * 1e12)
        ys = self.report.get("yardsticks") or {}
        gemm = ys.get(f"gemm_{entry['precision']}", {})
        if "gbps" in ys.get("copy", {}) and "tflops" in gemm:
            peaks["measured"] = (ys["copy"]["gbps"] * 1e9, gemm["tflops"] * 1e12)
        out: dict[str, Any] = {"storage": costs["storage"], "note": costs["note"]}
        for impl in ("fused", "reference"):
            out[f"{impl}_bytes"] = sum(b for _, b, _ in costs[impl])
            out[f"{impl}_flops"] = sum(f for _, _, f in costs[impl])
        seconds = entry["fused_ms"] / 1e3
        out["fused_gbps"] = out["fused_bytes"] / seconds / 1e9
        out["fused_tflops"] = out["fused_flops"] / seconds / 1e12
        for source, (bw, flops) in peaks.items():
            out[f"fused_bandwidth_fraction_{source}"] = out["fused_bytes"] / seconds / bw
            out[f"fused_flops_fraction_{source}"] = out["fused_flops"] / seconds / flops
            for impl in ("fused", "reference"):
                predicted = sum(max(b / bw, f / flops) for _, b, f in costs[impl])
                out[f"predicted_{impl}_ms_{source}"] = predicted * 1e3
        out["peaks"] = {k: {"memory_gbps": bw / 1e9, "tflops": fl / 1e12} for k, (bw, fl) in peaks.items()}
        return out

    # -- compile
    def _compile(self, entry: dict[str, Any], bundle, result: dict[str, Any]) -> None:
        import torch._dynamo
        torch._dynamo.reset()
        result["impl"] = "compiled"
        m = self._measure(bundle, "compiled", entry["_precision"].matmul, first_call=True)
        result.pop("impl")
        entry.update(compiled_reference_ms=m["ms"], compile_s=m["compile_s"],
                     peak_compiled_reference_bytes=m["peak_bytes"])
        entry["timing"]["compiled_reference"] = m
        if entry["fused_ms"]:
            entry["speedup_vs_compiled_reference"] = m["ms"] / entry["fused_ms"]
        result["status"] = "done"

    # ------------------------------------------------------------------------------------ the end
    def finish(self, stopped: str | None) -> int:
        with self.lock:
            if stopped and self.current is not None:        # the case the stop interrupted
                phase, entry = self.current
                entry["phases"][phase] = {"status": "interrupted", "reason": stopped}
                if phase == "check":
                    entry.update(status="interrupted", passed=False, error=f"interrupted: {stopped}")
            for e in self.entries:
                if e["status"] == "pending":
                    e["status"], e["skipped"] = "skipped", stopped or "not reached within the budget"
            self.report.update(finished=stopped is None, stopped=stopped)
            report = self.snapshot()
            write_json(self.out / JSON_NAME, report)
            table = markdown(report)
            write_text(self.out / MD_NAME, table)
        print(table, flush=True)
        failed = report["summary"]["failed"]
        self._log(f"{report['summary']['passed']} of {report['summary']['checked']} checked cases passed, "
                  f"{report['summary']['skipped']} skipped; {self.out / JSON_NAME}")
        return 1 if failed or stopped else 0

    def watchdog(self, grace: float) -> threading.Timer:
        """At budget + ``grace``: the JSON and table written with what is done, and the process ends (a case
        that hangs, e.g. a kernel that never returns, cannot be interrupted otherwise)."""
        def fire():
            self._log(f"watchdog: past the budget by {grace:.0f} s; writing what is done and exiting")
            try:
                if self.lock.acquire(timeout=10):
                    self.lock.release()
                    self.finish(f"watchdog: a case ran past the budget ({self.args.budget:.0f} s) + {grace:.0f} s")
            finally:
                os._exit(1)
        timer = threading.Timer(max(self.remaining(), 0.0) + grace, fire)
        timer.daemon = True
        timer.start()
        return timer


# ---------------------------------------------------------------------------------------- the table
