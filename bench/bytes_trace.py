"""Counting the bytes Triton kernels move, under the interpreter (the engine of ``bench.bytes_moved``).

``measure_launch(fn, batch=..., target_batch=..., target_fn=...)`` runs ``fn`` (which launches kernels under
``TRITON_INTERPRET=1``) with the interpreter's masked load and store wrapped, and records per program
the addresses of the lanes whose mask is on. Per kernel launch and in total:

- ``logical_load`` / ``logical_store``: bytes the programs ask for, lanes x element size. A tile that
  several programs read (one sample's feature map read by every query block) counts every time.
- ``compulsory`` (``unique_load + unique_store``): distinct bytes over the op: each input element read
  once, each output element written once.
- ``hbm_estimate``: distinct 32-byte sectors touched per *wave*, summed over waves. A GPU dispatches
  programs in grid order (axis 0 fastest) and runs ``SMs x CTAs/SM`` of them side by side; programs of
  one wave that read the same tile get it from L2 after the first fetch (this needs the shared tile,
  e.g. one sample's feature map, 1.6 MB in fp32, to fit in the 50 MB L2), and nothing is assumed to
  survive in L2 from one wave to the next (a conservative model). Stores are counted the same way.

Scaling. The interpreter runs about a millisecond per program, so the trace is taken at a small batch
(B=2, real C, N, P) and extrapolated to the real batch: ``target_fn`` (the same launch at the target
batch) is dry-run to read its grids without executing; every target program is the copy of a traced
program on another sample. The grid axis that grows with B is found by comparing the grids, and the
batch must be the slowest index of that axis (``pid = b * inner + rest``, or an axis of its own); a row
kernel whose blocks of rows straddle samples (its grid grows by other than the batch ratio) is scaled
linearly (each row is read and written once).
A tensor argument whose size grows with the batch (per-sample data: x, parts, probs, outputs) has its
addresses relabelled per copy; the others (folded queries, LayerNorm weights) are shared by all
samples. A kernel whose grid does not grow with B (a reduction over the batch inside each program)
reads every copy's data from every program.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["measure_launch", "H100_SMS", "L2_BYTES", "SECTOR_BYTES"]

H100_SMS = 132
L2_BYTES = 50 * 1024 * 1024
SECTOR_BYTES = 32   # L2 <-> HBM transfers move 32-byte sectors
_COPY_SHIFT = 46    # sector ids of copy c are offset by c << 46 (addresses stay below 2^51)


@dataclass
class _Program:
    grid_idx: tuple[int, int, int]
    loads: list = field(default_factory=list)   # (element addresses, element bytes)
    stores: list = field(default_factory=list)


@dataclass
class _Launch:
    kernel: str
    grid: tuple[int, int, int] = (1, 1, 1)
    programs: list[_Program] = field(default_factory=list)
    tensors: list[tuple[int, int]] = field(default_factory=list)  # (storage address, nbytes) per tensor arg


def _require_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("bench.bytes_moved counts loads and stores under the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before the kernels are imported")


def _grid3(grid) -> tuple[int, int, int]:
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


@contextlib.contextmanager
def _tracing(execute: bool = True):
    """Wraps the interpreter's launch, program index and masked load/store; yields the launch list.

    With ``execute=False`` launches only record their grid (a dry run at a size too big to interpret).
    """
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    launches: list[_Launch] = []
    orig_call = interp.GridExecutor.__call__
    orig_idx, orig_dim = builder.set_grid_idx, builder.set_grid_dim
    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store

    def call(self, *args, **kwargs):
        tensors = [a.untyped_storage() for a in list(args) + list(kwargs.values()) if hasattr(a, "untyped_storage")]
        launches.append(_Launch(kernel=self.fn.__name__, tensors=[(t.data_ptr(), t.nbytes()) for t in tensors]))
        if not execute:
            if callable(self.grid):
                raise TypeError(f"{self.fn.__name__}: a dry run needs a tuple grid, not a callable")
            launches[-1].grid = _grid3(self.grid)
            return None
        return orig_call(self, *args, **kwargs)

    def set_grid_dim(nx, ny, nz):
        if launches:
            launches[-1].grid = (nx, ny, nz)
        return orig_dim(nx, ny, nz)

    def set_grid_idx(x, y, z):
        if launches:
            launches[-1].programs.append(_Program(grid_idx=(x, y, z)))
        return orig_idx(x, y, z)

    def lanes(ptrs, mask) -> tuple[np.ndarray, int]:
        on = np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)
        elem = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        return np.asarray(ptrs.data)[on].astype(np.uint64), elem

    # The cache and eviction arguments after the first three differ between Triton releases (3.6: cache
    # modifier, eviction policy, volatile; 3.9: cache policy, volatile): passed on as they come.
    def masked_load(ptrs, mask, other, *policy):
        if launches and launches[-1].programs:
            launches[-1].programs[-1].loads.append(lanes(ptrs, mask))
        return orig_load(ptrs, mask, other, *policy)

    def masked_store(ptrs, value, mask, *policy):
        if launches and launches[-1].programs:
            launches[-1].programs[-1].stores.append(lanes(ptrs, mask))
        return orig_store(ptrs, value, mask, *policy)

    interp.GridExecutor.__call__ = call
    builder.set_grid_idx, builder.set_grid_dim = set_grid_idx, set_grid_dim
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    try:
        yield launches
    finally:
        interp.GridExecutor.__call__ = orig_call
        for name in ("set_grid_idx", "set_grid_dim", "create_masked_load", "create_masked_store"):
            builder.__dict__.pop(name, None)


class _Access:
    """One program's loads (or stores), split into shared and per-sample (batched) addresses."""

    def __init__(self, accesses: list, ranges: list[tuple[int, int]]):
        self.logical = {"shared": 0, "batched": 0}
        elems: dict[str, dict[int, list]] = {"shared": {}, "batched": {}}
        for addrs, elem in accesses:
            inside = np.zeros(addrs.shape, dtype=bool)
            for lo, hi in ranges:
                inside |= (addrs >= lo) & (addrs < hi)
            for kind, sel in (("batched", inside), ("shared", ~inside)):
                picked = addrs[sel]
                self.logical[kind] += picked.size * elem
                elems[kind].setdefault(elem, []).append(picked)
        self.elems = {k: {e: np.unique(np.concatenate(a)) for e, a in d.items()} for k, d in elems.items()}
        self.sectors = {k: _unique([a // SECTOR_BYTES for a in d.values()]) for k, d in self.elems.items()}


def _unique(arrays: Iterable[np.ndarray]) -> np.ndarray:
    arrays = [a for a in arrays if a.size]
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.uint64)


def _unique_bytes(accesses: list[_Access], kind: str) -> int:
    by_elem: dict[int, list] = {}
    for a in accesses:
        for e, addrs in a.elems[kind].items():
            by_elem.setdefault(e, []).append(addrs)
    return sum(e * _unique(v).size for e, v in by_elem.items())


class _NotBatchAligned(ValueError):
    """The grid does not grow by whole copies of the traced batch (rows of B * h * P split into blocks)."""


def _target_programs(trace: _Launch, target_grid: tuple[int, int, int], batch: int, copies: int):
    """Target programs in dispatch order as (traced program index, copy or None for all copies)."""
    index = {p.grid_idx: i for i, p in enumerate(trace.programs)}
    gs, gt = trace.grid, target_grid
    grown = [a for a in range(3) if gs[a] != gt[a]]
    if len(grown) > 1 or (grown and gt[grown[0]] != gs[grown[0]] * copies):
        raise _NotBatchAligned(f"{trace.kernel}: grid {gs} at the traced batch and {gt} at the target batch: "
                               "expected one axis to grow by the batch ratio")
    axis = grown[0] if grown else None
    inner = gs[axis] // batch if axis is not None else 0
    if axis is not None and gs[axis] % batch:
        raise ValueError(f"{trace.kernel}: grid axis {axis} of size {gs[axis]} is not a multiple of B={batch}")
    for z in range(gt[2]):
        for y in range(gt[1]):
            for x in range(gt[0]):
                idx = [x, y, z]
                if axis is None:
                    yield index[tuple(idx)], None
                    continue
                b = idx[axis] // inner
                idx[axis] = (b % batch) * inner + idx[axis] % inner
                yield index[tuple(idx)], b // batch


def _summarise(trace: _Launch, target_grid, batch: int, copies: int, wave: int, ranges) -> tuple[dict, list, list]:
    loads = [_Access(p.loads, ranges) for p in trace.programs]
    stores = [_Access(p.stores, ranges) for p in trace.programs]
    order = list(_target_programs(trace, target_grid, batch, copies))

    def hbm(accesses: list[_Access]) -> tuple[int, int]:
        total, footprint, cache = 0, 0, {}
        for start in range(0, len(order), wave):
            chunk = order[start:start + wave]
            ids = sorted({i for i, _ in chunk})
            shared = _unique(accesses[i].sectors["shared"] for i in ids).size
            by_copy: dict[Any, set] = {}
            for i, c in chunk:
                by_copy.setdefault(c, set()).add(i)
            batched = 0
            for c, members in by_copy.items():
                key = frozenset(members)
                if key not in cache:
                    cache[key] = _unique(accesses[i].sectors["batched"] for i in members).size
                batched += cache[key] * (copies if c is None else 1)
            sectors = shared + batched
            total += sectors
            footprint = max(footprint, sectors)
        return total * SECTOR_BYTES, footprint * SECTOR_BYTES

    def logical(accesses: list[_Access]) -> int:
        return sum(accesses[i].logical["shared"] + accesses[i].logical["batched"] * (copies if c is None else 1)
                   for i, c in order)

    hbm_load, foot_load = hbm(loads)
    hbm_store, foot_store = hbm(stores)
    out = {
        "kernel": trace.kernel, "traced_grid": list(trace.grid), "grid": list(target_grid),
        "programs": len(order), "programs_per_wave": wave, "waves": -(-len(order) // wave),
        "logical_load": logical(loads), "logical_store": logical(stores),
        "unique_load": _unique_bytes(loads, "shared") + copies * _unique_bytes(loads, "batched"),
        "unique_store": _unique_bytes(stores, "shared") + copies * _unique_bytes(stores, "batched"),
        "hbm_load": hbm_load, "hbm_store": hbm_store, "wave_footprint": foot_load + foot_store,
    }
    out["per_program_load"] = out["logical_load"] / max(len(order), 1)
    out["logical"] = out["logical_load"] + out["logical_store"]
    out["compulsory"] = out["unique_load"] + out["unique_store"]
    out["hbm_estimate"] = hbm_load + hbm_store
    return out, loads, stores


def _batched_ranges(traced: _Launch, target: _Launch, copies: int) -> list[tuple[int, int]]:
    """Storage ranges of the traced launch's tensor arguments that grow with the batch."""
    if copies == 1:
        return [(ptr, ptr + n) for ptr, n in traced.tensors]  # no extrapolation: nothing to relabel
    return [(ptr, ptr + n) for (ptr, n), (_, big) in zip(traced.tensors, target.tensors, strict=True)
            if big > n]


def measure_launch(fn: Callable[[], Any], *, batch: int = 1,
                   target_batch: int | None = None, target_fn: Callable[[], Any] | None = None,
                   sms: int = H100_SMS, ctas_per_sm: int | dict[str, int] = 1) -> dict[str, Any]:
    """Traces the kernels ``fn()`` launches under the interpreter; returns their byte counts in bytes.

    ``{"launches": [per launch], "logical_load", "logical_store", "logical", "unique_load", "unique_store",
    "compulsory", "hbm_load", "hbm_store", "hbm_estimate", ...}``, extrapolated to ``target_batch``
    when it is given (``target_fn`` launches the same kernels at that batch; it is only dry-run).
    ``ctas_per_sm``: occupancy, one number or per kernel name (e.g. from ``kernels.inspect``); a wave is
    ``sms x ctas_per_sm`` programs.
    """
    _require_interpreter()
    target_batch = target_batch or batch
    if target_batch % batch:
        raise ValueError(f"target_batch={target_batch} must be a multiple of batch={batch}")
    if target_batch != batch and target_fn is None:
        raise ValueError("target_fn (the launch at the target batch) is needed to extrapolate")
    copies = target_batch // batch
    with _tracing() as traced:
        fn()
    if target_batch != batch:
        with _tracing(execute=False) as dry:
            target_fn()
        dry_kernels, traced_kernels = [d.kernel for d in dry], [t.kernel for t in traced]
        if dry_kernels != traced_kernels:
            raise ValueError(f"the target launch runs {dry_kernels}, the traced one {traced_kernels}")
    else:
        dry = traced
    results, loads, stores = [], [], []
    for launch, target in zip(traced, dry, strict=True):
        occ = ctas_per_sm.get(launch.kernel, 1) if isinstance(ctas_per_sm, dict) else ctas_per_sm
        ranges = _batched_ranges(launch, target, copies)
        wave = sms * max(occ, 1)
        try:
            summary, load, store = _summarise(launch, target.grid, batch, copies, wave, ranges)
        except _NotBatchAligned:
            # A row kernel over all B * h * P rows in blocks that straddle samples: each row is read and
            # written once by one program, so its bytes scale with the batch; the traced figures times
            # the batch ratio, in the target grid's waves.
            summary, load, store = _summarise(launch, launch.grid, batch, 1, wave, ranges)
            for key in ("logical_load", "logical_store", "unique_load", "unique_store", "hbm_load", "hbm_store",
                        "logical", "compulsory", "hbm_estimate"):
                summary[key] *= copies
            programs = target.grid[0] * target.grid[1] * target.grid[2]
            summary.update(grid=list(target.grid), programs=programs, waves=-(-programs // wave),
                           per_program_load=summary["logical_load"] / max(programs, 1), extrapolation="linear")
        results.append(summary)
        loads += load
        stores += store
    keys = ("logical_load", "logical_store", "logical", "hbm_load", "hbm_store", "hbm_estimate")
    total: dict[str, Any] = {k: sum(r[k] for r in results) for k in keys}
    # Compulsory over the whole op: x read by the statistics pass and by the main kernel is one read.
    total["unique_load"] = _unique_bytes(loads, "shared") + copies * _unique_bytes(loads, "batched")
    total["unique_store"] = _unique_bytes(stores, "shared") + copies * _unique_bytes(stores, "batched")
    total["compulsory"] = total["unique_load"] + total["unique_store"]
    total.update(launches=results, batch=batch, target_batch=target_batch)
    return total
