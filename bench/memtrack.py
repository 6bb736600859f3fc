"""Memory, saved-tensor and FLOP measurement that works the same on CPU and CUDA.

On CPU there is no allocator to ask, so ``LiveTensorTracker`` watches every op output through a
``TorchDispatchMode`` and keeps the sum of the storages created while it is active that are still
alive (a ``weakref.finalize`` on each storage subtracts it when it is freed). On CUDA it reads the
caching allocator's ``max_memory_allocated`` instead. Either way ``peak_bytes`` is the high-water mark
of memory allocated *inside* the block: tensors that existed at entry (inputs, parameters) do not count.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorTracker", "peak_live_bytes", "profiler_peak_bytes", "saved_tensor_bytes", "count_flops",
           "nvml_used_bytes"]


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _storage_key(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse / meta / wrapper tensors without a plain storage
        return None


class _StorageWatch(TorchDispatchMode):
    """Adds the storage of every op output that is not one of the op's inputs (a fresh allocation)."""

    def __init__(self, tracker: "LiveTensorTracker"):
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
        self._mode: Optional[_StorageWatch] = None

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

    def __enter__(self) -> "LiveTensorTracker":
        self.peak_bytes = 0
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._live.clear()
            self._current = 0
            self._mode = _StorageWatch(self)
            self._mode.__enter__()
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


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmul-like ops ``fn()`` runs (``torch.utils.flop_counter``; elementwise ops are free)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def nvml_used_bytes(index: int = 0) -> Optional[int]:
    """Device memory in use as NVML sees it (all processes, driver and allocator cache); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
