"""The GPU verdict's cases: what each op runs, fused and reference, on which inputs, and how the results
are held to the tests' tolerances.

A ``Case`` is one op at one configuration (heads, views, options of the fused module); a variant is one
more line in ``CASES``, e.g. a plan flag of the fused head::

    Case("head", heads=1, views=4, plan=(("head_fwd_one_pass", True),), label="one_pass"),

Each case runs at every ``Precision``. ``bundle(case, precision, shapes, device)`` builds its inputs once
(seeded) and gives a ``Step`` per implementation: "truth" (the reference in float64), "reference" (the
reference in the case's precision: the parity rule's baseline), "fused" (c2f with ``backend="triton"``:
compiled kernels on a GPU, the interpreter on CPU) and "compiled" (``torch.compile`` of the reference).
``bench.gpu_check.check`` runs truth, reference and fused forward + backward with one shared upstream
gradient and compares every output and gradient by ``tests/parity.py``'s rule; ``model_costs`` gives
``bench.roofline``'s bytes and FLOPs of the case.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from c2f.part_attention import pick_formulation

from . import roofline

__all__ = ["Shapes", "PRODUCTION", "SMOKE", "Precision", "PRECISIONS", "Case", "CASES", "Step", "Bundle", "bundle",
           "tolerance", "labels", "model_costs"]


@dataclass(frozen=True)
class Shapes:
    B: int
    C: int
    H: int
    W: int
    P: int
    classes: int

    @property
    def N(self) -> int:
        return self.H * self.W


PRODUCTION = Shapes(B=64, C=2048, H=14, W=14, P=312, classes=200)
# The interpreter costs about 0.7 ms a program: the smoke run keeps every launch to a few programs. C=64
# keeps the formulations as in production (pick_formulation on Triton: 1 and 16 heads folded).
SMOKE = Shapes(B=2, C=64, H=4, W=4, P=7, classes=5)


@dataclass(frozen=True)
class Precision:
    """``dot_precision`` of the fused modules; ``low``: bf16 (attention and head under ``torch.autocast``,
    the mixups on bf16 parts); ``matmul``: ``torch.set_float32_matmul_precision`` for the fused and the
    timed reference steps (the float64 truth and the parity baseline always run at "highest")."""
    name: str
    dot_precision: str
    low: bool
    matmul: str


PRECISIONS = (Precision("fp32-ieee", "ieee", False, "highest"), Precision("fp32-tf32", "tf32", False, "high"),
              Precision("bf16", "tf32", True, "highest"))
PRECISION = {p.name: p for p in PRECISIONS}

# Relative atol of the parity rule per op family and precision, and where each is documented.
TOLERANCES = {
    ("module", "fp32-ieee"): (1e-5, "tests/parity.py rule; tests/test_part_attention.py, "
                                    "tests/test_c2f_head.py fp32 atol"),
    ("module", "fp32-tf32"): (4 * 2 ** -10, "docs/design.md 'Precision': TF32 normwise bound 4 x 2^-10"),
    ("module", "bf16"): (2e-2, "tests/test_amp.py ATOL[bfloat16] (autocast)"),
    ("mixup", "fp32-ieee"): (1e-5, "tests/test_part_mixup.py DTYPES fp32"),
    ("mixup", "fp32-tf32"): (1e-5, "tests/test_part_mixup.py DTYPES fp32: the mixup kernels have no dot precision "
                                   "option, their dots are fp32-accurate"),
    ("mixup", "bf16"): (1e-2, "tests/test_part_mixup.py DTYPES bf16 (bf16 parts)"),
}


@dataclass(frozen=True)
class Case:
    """One op at one configuration. ``op``: "attention", "part_mixup_", "part_mixup_pool" or "head";
    ``views``: K mixed views (pool and head); ``x_grad``: whether the op's input requires a gradient (the
    frozen backbone's features do not; the mixups' parts do); ``options``: keyword arguments of the fused
    module, ``plan``: plan flags (``c2f.kernels.plans.PLAN_FLAGS``) the fused path runs under (a variant of
    the fused path either way); ``label`` names the variant."""
    op: str
    heads: int = 1
    views: int = 1
    x_grad: bool = False
    options: tuple[tuple[str, Any], ...] = ()
    plan: tuple[tuple[str, bool], ...] = ()
    label: str = ""

    @property
    def family(self) -> str:
        return "mixup" if self.op.startswith("part_mixup") else "module"

    @property
    def name(self) -> str:
        base = {"attention": f"attention_h{self.heads}", "part_mixup_": "part_mixup_",
                "part_mixup_pool": f"part_mixup_pool_k{self.views}", "head": f"head_h{self.heads}_k{self.views}"}
        return base[self.op] + (f"_{self.label}" if self.label else "")


# Most informative first: the budget cuts from the end of each phase.
CASES = (
    Case("attention", heads=1),
    Case("attention", heads=16),
    # 16 heads on the Triton backend run folded (c2f.part_attention.TRITON_FOLDED_FLOPS); unfolded for the
    # first GPU to compare: chunked torch ops, the FLOP-cheaper formulation.
    Case("attention", heads=16, options=(("formulation", "unfolded"),), label="unfolded"),
    Case("part_mixup_", x_grad=True),
    Case("part_mixup_pool", views=4, x_grad=True),
    Case("part_mixup_pool", views=32, x_grad=True),
    Case("head", heads=1, views=4),
    Case("head", heads=16, views=4),
    Case("head", heads=1, views=32),
    # Issue 24's stretch: the head forward in one launch (the plan flag; off by default), run both ways.
    Case("head", heads=1, views=4, plan=(("head_fwd_one_pass", True),), label="one_pass"),
    Case("head", heads=16, views=4, plan=(("head_fwd_one_pass", True),), label="one_pass"),
)


def tolerance(case: Case, precision: Precision) -> tuple[float, str]:
    """(relative atol, its source) of the parity rule for a case at a precision."""
    return TOLERANCES[(case.family, precision.name)]


def labels(case: Case, precision: Precision) -> dict[str, Any]:
    """What a case runs in: ``dtype`` ("float32" or "bfloat16"), ``amp`` (how bf16 runs: "autocast" for the
    attention and the head, whose inputs and parameters stay fp32; "cast" for the mixups' bf16 parts; None)
    and ``dot_precision`` of the Triton dots (None for the mixups, whose dots are fp32-accurate)."""
    mixup = case.family == "mixup"
    return {"dtype": "bfloat16" if precision.low else "float32",
            "amp": ("cast" if mixup else "autocast") if precision.low else None,
            "dot_precision": None if mixup else ("bf16" if precision.low else precision.dot_precision)}


@dataclass
class Step:
    """One implementation of a case: ``setup`` (untimed: fresh leaves, gradients cleared), ``run`` (forward +
    backward with the shared upstream gradient), ``results`` (outputs and gradients of the last run, by
    name) and ``dtypes`` (the output dtypes of the last run)."""
    setup: Callable[[], None]
    run: Callable[[], None]
    results: Callable[[], dict[str, torch.Tensor]]
    dtypes: Callable[[], list[str]]


def _autocast(device: torch.device, low: torch.dtype | None):
    return torch.autocast(device.type, dtype=low) if low is not None else contextlib.nullcontext()


def _module_step(module: torch.nn.Module, x: torch.Tensor, extra: tuple, grads: list[torch.Tensor],
                 names: tuple[str, ...], amp: torch.dtype | None, x_grad: bool) -> Step:
    state: dict[str, Any] = {}

    def setup():
        module.zero_grad(set_to_none=True)
        state.clear()
        state["x"] = x.detach().requires_grad_(x_grad)

    def run():
        with _autocast(x.device, amp):
            out = tuple(module(state["x"], *extra))
        torch.autograd.backward(out, [g.to(o.dtype) for g, o in zip(grads, out, strict=True)])
        state["out"] = out

    def results():
        named = {n: o.detach() for n, o in zip(names, state["out"], strict=True)}
        for n, p in module.named_parameters():
            named[f"d {n}"] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
        if x_grad:
            named["d x"] = state["x"].grad.detach()
        return named

    return Step(setup, run, results, lambda: [str(o.dtype).replace("torch.", "") for o in state["out"]])


def _with_plan_flags(step: Step, flags: dict[str, bool]) -> Step:
    """``step`` with its forward + backward run under ``c2f.kernels.plans.plan_flags(**flags)``."""
    from c2f.kernels.plans import plan_flags

    def run():
        with plan_flags(**flags):
            step.run()
    return Step(step.setup, run, step.results, step.dtypes)


def _function_step(fn: Callable, parts: torch.Tensor, grad: torch.Tensor, clone: bool) -> Step:
    """``fn(parts)`` forward + backward; ``clone``: ``fn`` mixes in place, so it gets a fresh non-leaf copy
    of the leaf (made in ``setup``, outside the timing), as a model's layer output would be."""
    state: dict[str, Any] = {}

    def setup():
        state.clear()
        state["leaf"] = parts.detach().requires_grad_(True)
        state["input"] = state["leaf"].clone() if clone else state["leaf"]

    def run():
        out = fn(state["input"])
        out.backward(grad.to(out.dtype))
        state["out"] = out

    def results():
        return {"out": state["out"].detach(), "d parts": state["leaf"].grad.detach()}

    return Step(setup, run, results, lambda: [str(state["out"].dtype).replace("torch.", "")])


class Bundle:
    """A case's inputs at one precision (built once, seeded) and a ``Step`` per implementation."""

    def __init__(self, case: Case, precision: Precision, shapes: Shapes, device: torch.device,
                 compile_backend: str = "inductor"):
        self.case, self.precision, self.shapes, self.device = case, precision, shapes, device
        self.compile_backend = compile_backend
        self.low = torch.bfloat16 if precision.low else None
        gen = torch.Generator(device=device).manual_seed(0)   # drawn on the device: B=64 inputs in no time
        torch.manual_seed(0)                     # the reference modules' own initialisation
        builder = {"attention": self._attention, "head": self._head, "part_mixup_": self._mixup,
                   "part_mixup_pool": self._mixup}[case.op]
        builder(gen)

    def input_shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.inputs.items()}

    # ---------------------------------------------------------------------------------------- builders
    def _randn(self, gen, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=self.device)

    def _rand(self, gen, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=self.device)

    def _reference_attention(self, module, gen) -> None:
        """Non-trivial affine and queries, as the parity tests set them, so every term of the algebra counts."""
        with torch.no_grad():
            module.norm.weight.copy_(self._rand(gen, module.dim) + 0.5)
            module.norm.bias.copy_(self._randn(gen, module.dim) * 0.5)
            module.queries.copy_(self._randn(gen, *module.queries.shape))

    def _attention(self, gen) -> None:
        from c2f import nn as c2fnn
        from c2f import reference
        sh, h = self.shapes, self.case.heads
        self.ref = reference.PartAttention(sh.C, sh.P, h)
        self._reference_attention(self.ref, gen)
        self.fused_cls = lambda: c2fnn.PartAttention(sh.C, sh.P, h, backend="triton",
                                                     dot_precision=self.precision.dot_precision,
                                                     **dict(self.case.options))
        self.inputs = {"x": self._randn(gen, sh.B, sh.C, sh.H, sh.W)}
        self.extra: tuple = ()
        self.grads = [self._randn(gen, sh.B, sh.P, sh.C), self._randn(gen, sh.B, sh.P, sh.N)]
        self.names = ("parts", "attn")

    def _head(self, gen) -> None:
        from c2f import nn as c2fnn
        from c2f import reference
        sh, h, k = self.shapes, self.case.heads, self.case.views
        self.ref = reference.C2FHead(sh.C, sh.P, sh.classes, h)
        self._reference_attention(self.ref.attention, gen)
        self.fused_cls = lambda: c2fnn.C2FHead(sh.C, sh.P, sh.classes, h, backend="triton",
                                               dot_precision=self.precision.dot_precision, **dict(self.case.options))
        perm = torch.arange(sh.B - 1, -1, -1, device=self.device)
        mask = (self._rand(gen, k, sh.B, sh.P) < 0.5).float()
        self.inputs = {"x": self._randn(gen, sh.B, sh.C, sh.H, sh.W), "perm": perm, "mask": mask}
        self.extra = (perm, mask)
        self.grads = [self._randn(gen, sh.B, sh.P), self._randn(gen, k, sh.B, sh.classes),
                      self._randn(gen, sh.B, sh.P, sh.N)]
        self.names = ("attr_pred", "logits", "attn")

    def _mixup(self, gen) -> None:
        sh, k = self.shapes, self.case.views
        perm = torch.arange(sh.B - 1, -1, -1, device=self.device)       # the flip: an involution
        pooled = self.case.op == "part_mixup_pool"
        mask = self._rand(gen, *((k,) if pooled else ()), sh.B, sh.P)
        self.inputs = {"parts": self._randn(gen, sh.B, sh.P, sh.C), "perm": perm, "mask": mask}
        out_shape = (k, sh.B, sh.C) if pooled else (sh.B, sh.P, sh.C)
        self.grads = [self._randn(gen, *out_shape)]

    # ------------------------------------------------------------------------------------------- steps
    def step(self, impl: str) -> Step:
        """The ``Step`` of "truth", "reference", "fused" or "compiled"."""
        if impl not in ("truth", "reference", "fused", "compiled"):
            raise ValueError(f"impl must be truth, reference, fused or compiled, got {impl!r}")
        if self.case.family == "mixup":
            return self._mixup_step(impl)
        truth = impl == "truth"
        if impl == "fused":
            module = self.fused_cls()
            module.load_state_dict(self.ref.state_dict())
        else:
            module = copy.deepcopy(self.ref)
            if truth:
                module = module.double()
        module = module.to(self.device)
        if impl == "compiled":
            module = torch.compile(module, backend=self.compile_backend)
        x = self.inputs["x"].double() if truth else self.inputs["x"]
        extra = tuple(a.double() if truth and a.is_floating_point() else a for a in self.extra)
        step = _module_step(module, x, extra, self.grads, self.names, None if truth else self.low, self.case.x_grad)
        return _with_plan_flags(step, dict(self.case.plan)) if impl == "fused" and self.case.plan else step

    def _mixup_step(self, impl: str) -> Step:
        from c2f import reference
        from c2f.part_mixup import part_mixup_, part_mixup_pool
        perm, mask = self.inputs["perm"], self.inputs["mask"]
        inplace = self.case.op == "part_mixup_"
        if impl == "fused":
            fused = part_mixup_ if inplace else part_mixup_pool
            fn = lambda parts: fused(parts, perm, mask, backend="triton")  # noqa: E731
        else:
            ref_fn = reference.part_mixup if inplace else reference.part_mixup_pool
            ref_fn = torch.compile(ref_fn, backend=self.compile_backend) if impl == "compiled" else ref_fn
            fn = lambda parts: ref_fn(parts, perm, mask)  # noqa: E731
        parts = self.inputs["parts"]
        parts = parts.double() if impl == "truth" else parts.to(self.low or parts.dtype)
        return _function_step(fn, parts, self.grads[0], clone=inplace and impl == "fused")


def bundle(case: Case, precision: Precision, shapes: Shapes, device: torch.device,
           compile_backend: str = "inductor") -> Bundle:
    return Bundle(case, precision, shapes, device, compile_backend)


# ------------------------------------------------------------------------------------------ bytes model

def model_costs(case: Case, precision: Precision, shapes: Shapes) -> dict[str, Any]:
    """``bench.roofline``'s compulsory bytes and matmul FLOPs of one forward + backward, fused and reference,
    per kernel: ``{"fused": [(op, bytes, flops)], "reference": [...], "storage", "note"}``.

    Storage is the dtype of what the kernels read and write: fp32 except the bf16 mixups (autocast keeps
    x and the parameters fp32). Where the fused attention runs the unfolded formulation (``pick_formulation``
    on the Triton backend, or the case's ``formulation`` option), its FLOPs are the reference's (the key
    projection and its gradients); the model's fused rows assume the folded one, so there the reference's
    FLOPs are taken."""
    storage = "bf16" if precision.low and case.family == "mixup" else "fp32"
    sh = roofline.Shape(B=shapes.B, C=shapes.C, N=shapes.N, P=shapes.P, h=case.heads, K=case.views)
    note = "bench.roofline: compulsory bytes (inputs read once, outputs written once) and matmul FLOPs"
    if case.op == "attention":
        fused = roofline.attention_fwd(sh, storage) + roofline.attention_bwd(sh, storage, needs_dx=case.x_grad)
        ref = roofline.reference_attention_fwd(sh, storage) + roofline.reference_attention_bwd(sh, storage)
        form = pick_formulation(dict(case.options).get("formulation", "auto"), case.heads, shapes.C, shapes.P,
                                "triton")
        if form == "unfolded":
            ref_flops = sum(o.flops for o in ref)
            fused = [roofline.OpCost(o.op, o.impl, o.dtype, o.bytes, ref_flops if i == 0 else 0.0)
                     for i, o in enumerate(fused)]
            note += "; unfolded formulation: the reference's FLOPs"
    elif case.op == "part_mixup_":
        fused = roofline.mixup_inplace(sh, storage) * 2           # backward: the same kernel on the gradient
        ref = roofline.reference_mixup(sh, storage, 1) + roofline.reference_mixup_bwd(sh, storage, 1)
    elif case.op == "part_mixup_pool":
        fused = roofline.mixup_pool(sh, storage, False) + roofline.mixup_pool(sh, storage, True)
        ref = roofline.reference_mixup_pool(sh, storage, False) + roofline.reference_mixup_pool(sh, storage, True)
    else:
        fused = roofline.head_step(sh, storage)
        ref = roofline.reference_head_step(sh, storage)
    rows = lambda ops: [(o.op, float(o.bytes), float(o.flops)) for o in ops]  # noqa: E731
    return {"fused": rows(fused), "reference": rows(ref), "storage": storage, "note": note}
