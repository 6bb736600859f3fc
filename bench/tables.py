"""The report's Markdown tables, from the merged pytest-benchmark JSON (``<out>/benchmark.json``).

A benchmark's ``extra_info`` (``bench.common.record``) carries its case, impl, params, device, peak
bytes, FLOPs, ops per step and the yardstick GEMM's throughput; its ``stats`` the rounds' times
(on CUDA ``extra_info["median_s"]``, from CUDA events, takes precedence).
"""
from __future__ import annotations

from typing import Any

MiB = 1024 * 1024
IMPL_ORDER = ("fused", "fused_compiled", "reference", "compiled")
IMPL_NAMES = {"fused": "c2f", "fused_compiled": "torch.compile(c2f)", "reference": "reference",
              "compiled": "torch.compile(reference)"}

__all__ = ["cases", "median_ms", "gemm_fraction", "minimal_gflops", "minimal_fraction", "minimal_formulas",
           "cases_table", "sweeps", "sweep_tables", "readme_table", "dtype_table", "compile_table", "notes_lines",
           "gemm_line", "headline", "fmt", "params_text", "case_order", "impl_order"]


def param_key(params: tuple) -> tuple:
    return tuple((k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))) for k, v in params)


def case_order(item) -> tuple:
    (name, params), _ = item
    return name, param_key(params)


def impl_order(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else 9


def cases(benchmarks: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{(case name, params as a sorted tuple): {impl: benchmark}}."""
    out: dict[tuple, dict[str, dict]] = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        key = (info.get("case", b.get("group") or b["name"]), tuple(sorted((info.get("params") or {}).items())))
        out.setdefault(key, {})[info.get("impl", b["name"])] = b
    return out


def median_ms(b: dict, stat: str = "median") -> float:
    if stat == "median" and b.get("extra_info", {}).get("median_s") is not None:
        return b["extra_info"]["median_s"] * 1e3
    return b["stats"][stat] * 1e3


def mib(b: dict, key: str) -> float | None:
    v = b.get("extra_info", {}).get(key)
    return None if v is None else v / MiB


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def params_text(params: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in params) or "-"


def gemm_fraction(b: dict, key: str = "gemm_flops_per_s") -> float | None:
    """The case's FLOPs over its median time, as a fraction of the yardstick GEMM's throughput (``key``:
    the fp32 GEMM, or ``gemm_amp_flops_per_s`` for the autocast dtype's). None where the FLOPs are
    incomplete (Triton kernels) or unknown."""
    info = b.get("extra_info", {})
    flops, gemm = info.get("flops"), info.get(key)
    if not flops or not gemm or info.get("flops_complete") is False or not median_ms(b):
        return None
    return flops / (median_ms(b) / 1e3) / gemm


def minimal_gflops(b: dict) -> float | None:
    """The case's minimal-algebra FLOPs (``bench.algebra``) over its median time, in GFLOP/s."""
    flops = b.get("extra_info", {}).get("minimal_flops")
    return None if not flops or not median_ms(b) else flops / (median_ms(b) / 1e3) / 1e9


def minimal_fraction(b: dict, key: str = "gemm_flops_per_s") -> float | None:
    """``minimal_gflops`` as a fraction of the yardstick GEMM's throughput measured in the same run."""
    rate, gemm = minimal_gflops(b), b.get("extra_info", {}).get(key)
    return None if rate is None or not gemm else rate * 1e9 / gemm


def minimal_formulas(rows) -> str:
    """``case: formula`` for every case of ``rows`` (``[(key, impls)]``) that has a minimal algebra."""
    found = {}
    for (name, _), impls in rows:
        formula = impls.get("fused", {}).get("extra_info", {}).get("minimal_formula")
        if formula:
            found[name] = formula
    return "; ".join(f"**{name}**: {formula}" for name, formula in sorted(found.items()))


def _ratio(num: float | None, den: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if num is None or not den else f"{num / den:{spec}}{suffix}"


def _peak_ratio(b: dict, ref: dict) -> str:
    return _ratio(b.get("extra_info", {}).get("peak_bytes"), ref.get("extra_info", {}).get("peak_bytes"))


def _ops(b: dict | None) -> str:
    """Aten ops per step, and on CUDA the GPU activities the profiler saw (Triton launches included)."""
    info = {} if b is None else b.get("extra_info", {})
    ops = "-" if info.get("ops") is None else str(info["ops"])
    return ops + (f" ({info['cuda_kernels']} GPU kernels)" if info.get("cuda_kernels") is not None else "")


def cases_table(benchmarks: list[dict]) -> str:
    lines = ["| case | params | impl | median (ms) | IQR (ms) | rounds | peak live (MiB) | saved for bwd (MiB) | "
             "GFLOP | GEMM fraction | GFLOP/s (minimal) | GEMM fraction (minimal) | aten ops / step | "
             "speedup vs reference | peak / reference peak | compile (s) | dtype |",
             "|" + "---|" * 17]
    for (name, params), impls in sorted(cases(benchmarks).items(), key=case_order):
        ref = impls.get("reference")
        for impl in sorted(impls, key=impl_order):
            b, info = impls[impl], impls[impl].get("extra_info", {})
            t_ratio = p_ratio = "-"
            if ref is not None and impl != "reference":
                t_ratio = _ratio(median_ms(ref), median_ms(b), suffix="x")
                p_ratio = _peak_ratio(b, ref)
            flops = info.get("flops")
            dtype = info.get("dtype", "") + (f" ({info['amp']} autocast)" if info.get("amp", "off") != "off" else "")
            lines.append(f"| {name} | {params_text(params)} | {IMPL_NAMES.get(impl, impl)} | {median_ms(b):.2f} | "
                         f"{median_ms(b, 'iqr'):.2f} | {b['stats']['rounds']} | {fmt(mib(b, 'peak_bytes'))} | "
                         f"{fmt(mib(b, 'saved_bytes'))} | {fmt(None if flops is None else flops / 1e9, '.2f')} | "
                         f"{fmt(gemm_fraction(b), '.2f')} | {fmt(minimal_gflops(b))} | "
                         f"{fmt(minimal_fraction(b), '.2f')} | {_ops(b)} | {t_ratio} | {p_ratio} | "
                         f"{fmt(info.get('compile_s'))} | {dtype} |")
    return "\n".join(lines)


def sweeps(benchmarks: list[dict]) -> dict[tuple, dict[str, list[tuple[Any, dict]]]]:
    """{(case, sweep param, other params): {impl: [(x, benchmark), ...] sorted by x}} for swept cases."""
    out: dict[tuple, dict[str, dict]] = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        var, params = info.get("sweep"), info.get("params") or {}
        if not var or var not in params:
            continue
        rest = tuple(sorted((k, v) for k, v in params.items() if k != var))
        out.setdefault((info.get("case"), var, rest), {}).setdefault(info.get("impl"), {})[params[var]] = b
    return {key: {impl: sorted(points.items(), key=lambda xb: xb[0]) for impl, points in series.items()}
            for key, series in out.items()}


def sweep_tables(benchmarks: list[dict], plot=None) -> str:
    """One table per swept case; ``plot(case, var, rest, series, impls)`` returns a PNG name or None."""
    parts = []
    for (case, var, rest), series in sorted(sweeps(benchmarks).items(), key=lambda kv: str(kv[0])):
        impls = sorted(series, key=impl_order)
        xs = sorted({x for impl in impls for x, _ in series[impl]})
        title = f"{case} vs {var}" + (f" ({params_text(rest)})" if rest else "")
        head = "| " + var + " | " + " | ".join(f"{IMPL_NAMES.get(i, i)} ms | peak MiB" for i in impls) + " |"
        lines = [f"#### {title}", "", head, "|" + "---|" * (1 + 2 * len(impls))]
        for x in xs:
            cells = []
            for impl in impls:
                b = dict(series[impl]).get(x)
                cells += ["-", "-"] if b is None else [f"{median_ms(b):.2f}", fmt(mib(b, "peak_bytes"))]
            lines.append(f"| {x} | " + " | ".join(cells) + " |")
        png = plot(case, var, rest, series, impls) if plot else None
        if png:
            lines += ["", f"![{title}]({png})"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _isa(b: dict) -> str:
    info = b.get("extra_info", {})
    return f"{info.get('isa', '?')}, {info.get('threads', '?')} thr" if info.get("device_kind") != "cuda" \
        else info.get("isa", "?")


def headline(benchmarks: list[dict]) -> list[tuple[tuple, dict[str, dict]]]:
    """The rows at the sizes the issues set targets at: cases also run compiled, and cases outside any
    sweep; a case that exists only in a sweep shows every point. Fused and reference both present."""
    all_cases = cases(benchmarks)
    rows = {k: v for k, v in all_cases.items()
            if "compiled" in v or "fused_compiled" in v or not any(b["extra_info"].get("sweep") for b in v.values())}
    for name in {n for n, _ in all_cases} - {n for n, _ in rows}:
        rows.update({k: v for k, v in all_cases.items() if k[0] == name})
    return [(k, v) for k, v in sorted(rows.items(), key=case_order)
            if not k[0].startswith("smoke") and "fused" in v and "reference" in v]


def readme_table(benchmarks: list[dict], notes: list[dict]) -> str:
    """The README's main table: c2f against the reference and torch.compile(reference), with the
    GEMM fraction and the aten ops per step."""
    lines = ["| case | params | c2f (ms) | reference (ms) | speedup | c2f GFLOP/s (minimal) | "
             "c2f GEMM fraction (minimal) | torch.compile(ref) (ms, speedup) | c2f / reference peak memory | "
             "c2f GEMM fraction (counted) | aten ops / step (c2f / ref) | ISA, threads |",
             "|" + "---|" * 12]
    rows = headline(benchmarks)
    for (name, params), impls in rows:
        f, r, c = impls["fused"], impls["reference"], impls.get("compiled")
        compiled = "-" if c is None else f"{median_ms(c):.1f} ({median_ms(c) / median_ms(f):.2f}x)"
        lines.append(f"| {name} | {params_text(params)} | {median_ms(f):.1f} | {median_ms(r):.1f} | "
                     f"{median_ms(r) / median_ms(f):.2f}x | {fmt(minimal_gflops(f))} | "
                     f"{fmt(minimal_fraction(f), '.2f')} | {compiled} | {_peak_ratio(f, r)} | "
                     f"{fmt(gemm_fraction(f), '.2f')} | {_ops(f)} / {_ops(r)} | {_isa(f)} |")
    formulas = minimal_formulas(rows)
    if formulas:
        lines += ["", "Minimal algebra (`bench/algebra.py`; 2 FLOPs a multiply-add; GEMM fraction (minimal) = these "
                  "FLOPs / the median time / the same run's yardstick GEMM; (counted) uses the FLOPs the "
                  f"implementation dispatches instead): {formulas}. Elementwise and memory-bound cases: n/a."]
    return "\n".join(lines)


def compile_table(benchmarks: list[dict], notes: list[dict]) -> str:
    """torch.compile(c2f) beside eager c2f (and the reference's pair): steady state and compile time."""
    lines = ["| case | params | c2f eager (ms) | torch.compile(c2f) (ms) | compiled / eager speedup | "
             "compile, first call (s) | graph breaks | torch.compile(ref): compile (s) | ISA, threads |",
             "|" + "---|" * 9]
    for (name, params), impls in sorted(cases(benchmarks).items(), key=case_order):
        f, fc, c = impls.get("fused"), impls.get("fused_compiled"), impls.get("compiled")
        if f is None or (fc is None and not any(n["case"] == name and n["impl"] == "fused_compiled" for n in notes)):
            continue
        if fc is None:
            error = next(n["error"] for n in notes if n["case"] == name and n["impl"] == "fused_compiled")
            lines.append(f"| {name} | {params_text(params)} | {median_ms(f):.1f} | **{error}** |||||{_isa(f)} |")
            continue
        info = fc["extra_info"]
        ref_compile = "-" if c is None else fmt(c["extra_info"].get("compile_s"))
        lines.append(f"| {name} | {params_text(params)} | {median_ms(f):.1f} | {median_ms(fc):.1f} | "
                     f"{median_ms(f) / median_ms(fc):.2f}x | {fmt(info.get('compile_s'))} | "
                     f"{info.get('graph_breaks', 'n/a')} | {ref_compile} | {_isa(f)} |")
    return "\n".join(lines) if len(lines) > 2 else "No torch.compile(c2f) case ran."


def dtype_table(benchmarks: list[dict], notes: list[dict]) -> str:
    """Each case with an ``amp`` param: fp32 against bf16 autocast, time, peak memory, the ISA."""
    pairs: dict[tuple, dict[str, dict]] = {}
    for (name, params), impls in cases(benchmarks).items():
        p = dict(params)
        if "amp" not in p:
            continue
        rest = tuple((k, v) for k, v in params if k != "amp")
        for impl, b in impls.items():
            pairs.setdefault((name, rest, impl), {})[p["amp"]] = b
    for n in notes:
        p = dict(n.get("params") or {})
        if "amp" in p:
            rest = tuple(sorted((k, v) for k, v in p.items() if k != "amp"))
            pairs.setdefault((n["case"], rest, n["impl"]), {}).setdefault(p["amp"], {"error": n["error"]})
    lines = ["| case | params | impl | fp32 (ms) | bf16 autocast (ms) | bf16 speedup (fp32 / bf16) | "
             "peak bf16 / fp32 | bf16 ops (of all) | GEMM bf16 / fp32 throughput | ISA, threads |",
             "|" + "---|" * 10]
    for (name, rest, impl), by_amp in sorted(pairs.items(), key=lambda kv: str(kv[0])):
        off, bf = by_amp.get("off"), by_amp.get("bf16")
        some = off if off and "stats" in off else bf
        isa = _isa(some) if some and "stats" in some else "-"
        off_ms = f"{median_ms(off):.1f}" if off and "stats" in off else "n/a"
        if bf is None or "stats" not in bf:
            reason = (bf or {}).get("error", "not run")
            lines.append(f"| {name} | {params_text(rest)} | {IMPL_NAMES.get(impl, impl)} | {off_ms} | **{reason}** "
                         f"|||| {isa} |")
            continue
        info = bf["extra_info"]
        ratio = _ratio(median_ms(off), median_ms(bf), suffix="x") if off and "stats" in off else "n/a"
        peak = _peak_ratio(bf, off) if off and "stats" in off else "n/a"
        gemm = _ratio(info.get("gemm_amp_flops_per_s"), info.get("gemm_flops_per_s"), ".3f")
        lines.append(f"| {name} | {params_text(rest)} | {IMPL_NAMES.get(impl, impl)} | {off_ms} | "
                     f"{median_ms(bf):.1f} | {ratio} | {peak} | {info.get('ops_low_precision', 'n/a')} of "
                     f"{info.get('ops', 'n/a')} | {gemm} | {isa} |")
    return "\n".join(lines) if len(lines) > 2 else "No dtype cases ran."


def notes_lines(notes: list[dict]) -> list[str]:
    lines = []
    for n in notes:
        params = params_text(tuple((n.get("params") or {}).items()))
        lines.append(f"- {n['case']} ({IMPL_NAMES.get(n['impl'], n['impl'])}, {params}): {n['error']}")
    return lines


def gemm_line(benchmarks: list[dict]) -> str:
    """The yardstick GEMM(s) measured in the run: shape, dtype, throughput per bench process."""
    seen: dict[tuple, list[float]] = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        for key in ("gemm", "gemm_amp"):
            if info.get(f"{key}_flops_per_s") and info.get(f"{key}_shape"):
                shape = tuple(info[f"{key}_shape"])
                seen.setdefault((shape, info.get(f"{key}_dtype", "float32")), []).append(info[f"{key}_flops_per_s"])
    parts = [f"[{m}, {k}] x [{k}, {n}] {dtype}: {min(vals) / 1e9:.1f} to {max(vals) / 1e9:.1f} GFLOP/s "
             f"over {len(vals)} cases" for ((m, k, n), dtype), vals in sorted(seen.items(), key=str)]
    return "; ".join(parts) or "not measured"
