"""Memory, saved-tensor and FLOP measurement that works the same on CPU and CUDA.

On CPU there is no allocator to ask, so ``LiveTensorTracker`` watches every op output through a
``TorchDispatchMode`` and keeps the sum of the storages created while it is active that are still
alive (a ``weakref.finalize`` on each storage subtracts it when it is freed). On CUDA it reads the
caching allocator's ``max_memory_allocated`` instead. Either way ``peak_bytes`` is the high-water mark
of memory allocated *inside* the block: tensors that existed at entry (inputs, parameters) do not count.

Registered custom ops (``torch.library.custom_op``: ``torch.ops.c2f.*``) are opaque to a dispatch mode:
the mode sees the op, and the aten ops its implementation runs happen while the mode is off. Every
mode here therefore sits under ``CustomOpExpander``, which runs a custom op's Python implementation
with the modes still watching, so temporaries, FLOPs and ops inside c2f's ops are counted.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorTracker", "CustomOpExpander", "OpCounter", "measure_step", "peak_live_bytes",
           "profiler_peak_bytes", "saved_tensor_bytes", "count_flops", "flop_counter", "cuda_kernel_launches",
           "device_used_bytes"]


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse / meta / wrapper tensors without a plain storage
        return None


def _custom_op_impl(func, device_type: str) -> Callable | None:
    """The Python implementation of a ``torch.library.custom_op`` for ``device_type``, or None (aten ops,
    ops defined in C++, or a torch whose private registry has moved)."""
    if getattr(func, "namespace", "aten") in ("aten", "prim", "prims", "_c10d_functional"):
        return None
    try:
        from torch._library.custom_ops import _maybe_get_opdef
        opdef = _maybe_get_opdef(func._schema.name)
    except (ImportError, AttributeError):
        return None
    if opdef is None:
        return None
    fns = getattr(opdef, "_backend_fns", {})
    return fns.get(device_type) or fns.get(None) or opdef._init_fn


class CustomOpExpander(TorchDispatchMode):
    """Runs registered Python custom ops by their implementation so the modes below it see their aten ops.

    Enter it last (innermost), after the modes that watch. ``expanded``: how many times each custom op
    ran; ``triton``: those whose ``backend`` argument was "triton" (their kernels launch no aten op, so
    neither their FLOPs nor their kernels are counted, only their allocations).
    """

    def __init__(self):
        super().__init__()
        self.expanded: Counter = Counter()
        self.triton: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors((args, kwargs))
        impl = _custom_op_impl(func, tensors[0].device.type if tensors else "cpu")
        if impl is None:
            return func(*args, **kwargs)
        name = func._schema.name
        self.expanded[name] += 1
        names = [a.name for a in func._schema.arguments]
        backend = kwargs.get("backend", args[names.index("backend")] if "backend" in names[:len(args)] else None)
        if backend == "triton":
            self.triton[name] += 1
        with self:  # nested custom ops are expanded too
            return impl(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active (under autograd: forward and backward ops).

    ``total``; ``views`` (ops whose output aliases an input: no kernel launch on a GPU); ``low_precision``
    (ops with a bf16/fp16 floating output: whether autocast changed anything); ``by_op`` per overload.
    """

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.views = 0
        self.low_precision = 0

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.by_op[str(func)] += 1
        if getattr(func, "is_view", False):
            self.views += 1
        if any(t.dtype in (torch.bfloat16, torch.float16) for t in _tensors(out)):
            self.low_precision += 1
        return out


class _StorageWatch(TorchDispatchMode):
    """Adds the storage of every op output that is not one of the op's inputs (a fresh allocation)."""

    def __init__(self, tracker: LiveTensorTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.device.type == "meta":
                continue
            key = _storage_key(t)
            if key is None or key in inputs:
                continue  # views and in-place results reuse an input's memory
            self.tracker._add(t.untyped_storage())
        return out


class LiveTensorTracker:
    """Context manager measuring the peak of memory allocated while it is active.

    ``peak_bytes``: the high-water mark of live bytes allocated inside the block (CPU: storages created
    by ops, parameter gradients included, since autograd creates them with ops; CUDA: the caching
    allocator's ``max_memory_allocated`` minus its value at entry). ``current_bytes``: live bytes now.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._live: dict[int, int] = {}  # storage data_ptr -> nbytes, CPU only
        self._current = 0
        self._baseline = 0
        self._mode: _StorageWatch | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def current_bytes(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) - self._baseline
        return self._current

    def _add(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._live:
            return
        self._live[key] = nbytes
        self._current += nbytes
        self.peak_bytes = max(self.peak_bytes, self._current)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.get(key) == nbytes:
            del self._live[key]
            self._current -= nbytes

    def __enter__(self) -> LiveTensorTracker:
        self.peak_bytes = 0
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._live.clear()
            self._current = 0
            self._mode = contextlib.ExitStack()
            self._mode.enter_context(_StorageWatch(self))
            self._mode.enter_context(CustomOpExpander())
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._baseline
        else:
            self._mode.__exit__(*exc)
            self._mode = None


def _device_of(tree: Any, default: str = "cpu") -> torch.device:
    for t in _tensors(tree):
        return t.device
    return torch.device(default)


def peak_live_bytes(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Runs ``fn()`` once and returns the peak bytes it had allocated and alive at any moment.

    ``device`` defaults to CUDA when it is available (the CUDA allocator sees tensors from any source).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with LiveTensorTracker(device) as tracker:
        fn()
    return tracker.peak_bytes


def profiler_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated (and alive) while ``fn()`` runs, from the profiler's CPU allocator events.

    For ``torch.compile``d code: any ``TorchDispatchMode`` (the tracker, the FLOP counter) makes Dynamo
    run the function eagerly, so the tracker would measure the uncompiled code. The profiler hooks the
    allocator instead and leaves compilation alone; on eager code it agrees with the tracker.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()  # negative for a free
        peak = max(peak, current)
    return peak


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Runs the forward ``fn()`` and returns the bytes autograd saved for backward while it ran.

    Storages are counted once however many saved tensors view them. They are held until the count is
    done, so a freed storage's address cannot be reused and miscounted.
    """
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            st = t.untyped_storage()
            storages.setdefault(st.data_ptr(), st)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(st.nbytes() for st in storages.values())
    del out
    return total


def _contraction_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """matmul, dot, mv and their ``out=`` forms: 2 x output elements x the contracted length."""
    out = 1
    for d in out_shape or ():
        out *= d
    return 2 * out * a_shape[-1]


def _addmv_flops(self_shape, mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat_shape[0] * mat_shape[1]


def _addbmm_flops(self_shape, b1_shape, b2_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * b1_shape[0] * b1_shape[1] * b1_shape[2] * b2_shape[2]


def flop_counter():
    """``FlopCounterMode`` that also counts what reaches a dispatch mode below autograd, as c2f's custom op
    implementations run: in-place GEMMs (``addmm_``, ``baddbmm_``), ``matmul`` and its ``out=`` form (not
    decomposed there), ``dot``/``mv``/``addmv``/``addbmm``. torch's registry counts only the out-of-place
    ``mm``/``addmm``/``bmm``/``baddbmm``, so these FLOPs went missing."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    def as_registered(packet):
        """torch's own formula, already wrapped to take tensors (marked so it is not wrapped twice)."""
        def formula(*args, **kwargs):
            return flop_registry[packet](*args, **kwargs)
        formula._get_raw = True
        return formula

    aten = torch.ops.aten
    extra = {aten.addmm_: as_registered(aten.addmm), aten.baddbmm_: as_registered(aten.baddbmm),
             aten.matmul: _contraction_flops, aten.dot: _contraction_flops, aten.vdot: _contraction_flops,
             aten.mv: _contraction_flops, aten.addmv: _addmv_flops, aten.addmv_: _addmv_flops,
             aten.addbmm: _addbmm_flops, aten.addbmm_: _addbmm_flops}
    return FlopCounterMode(display=False, custom_mapping={k: v for k, v in extra.items() if k not in flop_registry})


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmul-like ops ``fn()`` runs, inside custom ops too (``torch.utils.flop_counter``;
    elementwise ops are free)."""
    counter = flop_counter()
    with counter, CustomOpExpander():
        fn()
    return counter.get_total_flops()


def measure_step(fn: Callable[[], Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Runs ``fn()`` once under the tracker, the FLOP counter and the op counter, custom ops expanded.

    Returns ``peak_bytes``, ``flops``, ``ops`` (aten ops dispatched), ``ops_nonview``, ``ops_low_precision``,
    ``custom_ops`` (custom-op calls expanded) and ``flops_complete`` (False when a custom op ran Triton
    kernels, whose FLOPs no dispatch mode sees).
    """
    flops, ops, expander = flop_counter(), OpCounter(), CustomOpExpander()
    with LiveTensorTracker(device) as tracker, flops, ops, expander:
        fn()
    return {"peak_bytes": tracker.peak_bytes, "flops": flops.get_total_flops(), "ops": ops.total,
            "ops_nonview": ops.total - ops.views, "ops_low_precision": ops.low_precision,
            "custom_ops": sum(expander.expanded.values()), "flops_complete": not expander.triton}


def cuda_kernel_launches(fn: Callable[[], Any]) -> int | None:
    """GPU activities (kernels, copies, memsets) one call of ``fn()`` puts on the device, from the profiler's
    CUDA activity trace: Triton launches included, which no dispatch mode sees. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # a profiler without CUPTI: the aten op count still stands
        return None


def device_used_bytes(device: torch.device | str | int | None = None) -> int | None:
    """Device memory in use as the driver sees it (all processes, allocator cache included); None without CUDA.

    ``torch.cuda.device_memory_used`` (NVML, or amdsmi on ROCm) where torch has it; nvidia-ml-py,
    imported only then, on older torch.
    """
    if not torch.cuda.is_available():
        return None
    used = getattr(torch.cuda, "device_memory_used", None)
    try:
        if used is not None:
            return int(used(device))
        import pynvml
        pynvml.nvmlInit()
        try:
            index = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
            handle = pynvml.nvmlDeviceGetHandleByIndex(index.index or 0)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library / driver query refused: the allocator's figures still stand
        return None
