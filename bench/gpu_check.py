"""The GPU verdict's correctness check: truth (float64), the reference and fused run once each, forward +
backward with one shared upstream gradient, every output and gradient compared by ``tests/parity.py``'s
rule, and the proof that the fused step ran the Triton kernels."""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .gpu_cases import Bundle, Step, tolerance
from .gpu_device import matmul_precision, synchronize

__all__ = ["FusedOps", "compare", "check", "StepError"]


class FusedOps(TorchDispatchMode):
    """Counts the c2f custom ops dispatched while active, by name and ``backend`` argument: the proof that
    the fused step ran the Triton kernels (``backend="triton"``) and not the torch-op path."""

    def __init__(self):
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == "c2f":
            names = [a.name for a in func._schema.arguments]
            backend = kwargs.get("backend")
            if backend is None and "backend" in names and names.index("backend") < len(args):
                backend = args[names.index("backend")]
            self.seen[f"{func._schema.name}[{backend}]"] += 1
        return func(*args, **kwargs)

    def backends(self) -> set:
        return {key[key.index("[") + 1:-1] for key in self.seen}


def compare(got: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor], truth: dict[str, torch.Tensor],
            atol: float) -> list[dict[str, Any]]:
    """One row per tensor of ``truth``: ``|got - truth| <= 2 |baseline - truth| + atol max|truth|`` (max norms;
    ``tests/parity.py``'s rule), with the errors relative to ``max|truth|``."""
    rows = []
    for name, want in truth.items():
        row: dict[str, Any] = {"tensor": name, "shape": list(want.shape)}
        have = got.get(name)
        if have is None or tuple(have.shape) != tuple(want.shape):
            row.update(passed=False, error=f"missing or shape {None if have is None else list(have.shape)}")
            rows.append(row)
            continue
        want = want.double()
        scale = want.abs().max().item() if want.numel() else 0.0
        scale = scale or 1.0
        err = (have.double() - want).abs().max().item() if want.numel() else 0.0
        ref_err = (baseline[name].double() - want).abs().max().item() if want.numel() else 0.0
        finite = bool(torch.isfinite(have).all())
        bound = 2 * ref_err + atol * scale
        row.update(max_abs_error=err, max_abs_truth=scale, rel_error=err / scale, reference_rel_error=ref_err / scale,
                   bound_rel=bound / scale, finite=finite, passed=finite and err <= bound)
        rows.append(row)
    return rows


class StepError(RuntimeError):
    """A step of a check raised; the message names the step ("truth", "reference" or "fused")."""


def _run_once(step: Step, device: torch.device, matmul: str, watch: FusedOps | None = None):
    step.setup()
    with matmul_precision(matmul, device), (watch if watch is not None else contextlib.nullcontext()):
        step.run()
    synchronize(device)
    return step.results(), step.dtypes()


def check(b: Bundle) -> dict[str, Any]:
    """Runs truth (float64), the reference baseline and fused once each, forward + backward, and compares.

    Returns ``passed``, ``max_rel_error`` (the worst tensor's max|fused - truth| / max|truth|), its
    ``bound_rel``, ``worst``, ``checks`` (a row per tensor, plus the output dtypes and the backend the
    fused ops ran) and ``fused_ops`` (the c2f ops dispatched, with their backend)."""
    atol, source = tolerance(b.case, b.precision)
    results, dtypes = {}, {}
    watch = FusedOps()
    for impl in ("truth", "reference", "fused"):
        step = b.step(impl)
        matmul = b.precision.matmul if impl == "fused" else "highest"
        try:
            results[impl], dtypes[impl] = _run_once(step, b.device, matmul, watch if impl == "fused" else None)
        except Exception as e:
            raise StepError(f"{impl} step: {type(e).__name__}: {e}") from e   # whose memory or bug it was
        del step                                 # the results stay; the step's module and graph go
    rows = compare(results["fused"], results["reference"], results["truth"], atol)
    rows.append({"tensor": "output dtypes", "fused": dtypes["fused"], "reference": dtypes["reference"],
                 "passed": dtypes["fused"] == dtypes["reference"]})
    backends = watch.backends()
    rows.append({"tensor": "backend", "fused": sorted(backends), "passed": backends == {"triton"},
                 **({} if backends == {"triton"} else {"error": "the fused step did not run only the Triton kernels"})})
    measured = [r for r in rows if "rel_error" in r]
    worst = max(measured, key=lambda r: r["rel_error"] / r["bound_rel"]) if measured else None
    return {"passed": all(r["passed"] for r in rows),
            "max_rel_error": max((r["rel_error"] for r in measured), default=None),
            "bound_rel": worst["bound_rel"] if worst else None, "worst": worst["tensor"] if worst else None,
            "bound_use": worst["rel_error"] / worst["bound_rel"] if worst else None,
            "atol_rel": atol, "tolerance_source": source, "checks": rows, "fused_ops": dict(watch.seen)}
