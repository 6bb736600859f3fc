"""One command for the whole performance picture: ``python -m bench.report --out results`` (``make bench``).

1. Runs every ``bench/bench_*.py`` with pytest-benchmark (``bench/pytest.ini``), one pytest process per
   file (a file that fails or runs out of time is reported and the others go on), merged into
   ``<out>/benchmark.json``. Each process also times the yardstick GEMM (``bench.machine``).
2. The static GPU check: one ``python -m c2f.kernels.inspect --arch sm_80 sm_90 sm_89 gfx942 --quick`` run,
   kept in ``<out>/inspect.json`` and reused while the kernel sources are unchanged.
3. Bytes moved per kernel, traced under the Triton interpreter (``python -m bench.bytes_moved``).
4. The roofline projections for A100, H100 and RTX 4090 (``bench.roofline``).
Then writes ``<out>/REPORT.md``, PNG plots of the sweeps, and ``<out>/README_TABLE.md`` for the README.

Without CUDA the run is quick by default (``C2F_BENCH_QUICK=1``: thinned sweeps, 3 rounds) so that the
bench part stays within about 10 minutes on a 2-core CPU; ``--full`` runs every sweep point. On CUDA it
is full. The parts live in ``bench.running`` (processes), ``bench.tables`` and ``bench.plots``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import running, tables
from .running import ROOT

__all__ = ["main", "write_report", "inspect_section", "bytes_section"]

BYTES_EXPLAINED = """\
How to read it. *Logical* bytes are what the programs ask for; *compulsory* bytes read every input and
write every output once; the *HBM estimate* lets programs that run in the same wave (132 SMs x CTAs/SM
from the sm_90 inspect rows, in grid order, axis 0 fastest) share what they read through L2, and keeps
nothing in L2 from one wave to the next. The trace is taken at B=2 with the real C=2048, N=196, P=312
(fp32) and extrapolated to B=64 (each B=64 program is the copy of a traced one on another sample).

Where the logical re-reads come from, and why they stay in L2:
- **attention forward**: every query block of a (sample, head) streams the sample's whole feature map,
  twice (once for S = G Xc, once for the values Xc^T): P/BLOCK_P programs x 2 reads of a 1.6 MB tile.
  Those programs are adjacent in the grid (the sample is the slowest index), so they run in the same
  wave and the tile comes from HBM once. The folded queries G (2.5 MB fp32 at h=1) are re-read by every
  sample's programs and stay in L2. The one real re-read is the statistics pass: the token mean/rstd
  must be known before the contraction, so x is streamed once more (the "stats" launch, the whole gap
  between the HBM estimate and compulsory).
- **attention backward**: the per-(sample, query block) kernel re-reads x per query block like the
  forward (shared in the wave); the dG kernel loops over the batch inside each of its programs, so every
  program streams every sample (logical = programs x x) and all of them fit in one wave. x is read by
  both launches: that second pass is the gap to compulsory (fusing it away would need a cross-sample
  reduction of dG inside one kernel, i.e. atomics or a batch-ordered grid).
- **part_mixup_**: each program reads its pair's two rows and writes both in place: logical =
  compulsory, nothing to share.
- **part_mixup_pool**: the programs of sample b and of its partner perm[b] both read the pair
  (logical = 2x the parts); the partner's program is in the same wave (samples are grid axis 0), so
  the second read hits L2. The backward re-reads the small [K, B, C] gradient per part block.
"""


def inspect_section(static: dict) -> str:
    """The inspect rows, one per kernel, plan and target, and what fails the check."""
    rows = static.get("kernels") or []
    if not rows and static.get("exit") is None:
        return "Not run."
    from c2f.kernels.inspect import KernelReport, format_table
    fields = set(KernelReport.__dataclass_fields__)
    reports = [KernelReport(**{k: v for k, v in r.items() if k in fields}) for r in rows]
    reports.sort(key=lambda r: (r.op, r.kernel, r.plan, r.target))
    failed = [r for r in reports if r.problems()]
    when = f"reused from {static.get('generated')}: kernel sources unchanged" if static.get("reused") else \
        f"{static.get('seconds')} s"
    cut = " **Timed out: no rows; run `make inspect` or `python -m bench.report --skip-bench` with more time.**" \
        if static.get("exit") == "timeout" else ""
    lines = [f"`{static.get('command')}` (exit status {static.get('exit')}; {when}).{cut} Registers and spills from "
             "ptxas -v (NVIDIA) or the amdgcn metadata (AMD), shared memory (LDS) against the target's per-block "
             "limit, tensor cores from the SASS (HMMA: mma.sync; HGMMA: wgmma on sm_90) or MFMA, CTAs/SM the occupancy "
             "bound from registers, shared memory and warps. Compiled offline; no GPU ran these kernels.", ""]
    by_target = {}
    for r in reports:
        by_target.setdefault(r.target, []).append(r)
    lines.append("**" + "; ".join(f"{t}: {len(rs)} compiles, {sum(1 for r in rs if r.problems())} failing"
                                  for t, rs in by_target.items()) + ".**")
    for r in failed:
        shapes = f"; shapes {', '.join(r.shapes)}" if r.shapes else ""
        lines.append(f"- {r.kernel} on {r.target} ({r.plan}, {r.num_warps} warps{shapes}): " + "; ".join(r.problems()))
    lines += ["", format_table(reports)]
    return "\n".join(lines)


def bytes_section(out: Path, status: dict) -> str:
    path = out / "bytes_moved.json"
    if not path.exists():
        return f"Not run (status {status.get('bytes_moved')}); see bytes_moved.log."
    from bench.bytes_moved import markdown
    rows = json.loads(path.read_text())
    cut = " **Cut off by the time budget: the cases below are those it finished.**" \
        if status.get("bytes_moved") == "timeout" else ""
    footprints = ", ".join(f"{launch['kernel']} {launch['wave_footprint'] / 1e6:.0f} MB" for r in rows
                           if "launches" in r for launch in r["launches"])
    return "\n".join([
        f"`TRITON_INTERPRET=1 python -m bench.bytes_moved` ({status.get('bytes_seconds')} s).{cut} "
        "MB = 1e6 bytes at B=64, fp32; waves of an H100 (132 SMs).", "", markdown(rows), "",
        f"Largest wave footprint per launch (all distinct bytes one wave touches at B=64): {footprints}. The model "
        "needs only the tile that programs share (one sample's map, 1.6 MB) to stay in L2 while its readers run, "
        "not the whole footprint.", "", BYTES_EXPLAINED])


def _device(benchmarks: list[dict]) -> str:
    for b in benchmarks:
        if b.get("extra_info", {}).get("device"):
            return b["extra_info"]["device"]
    from bench.common import bench_device
    from bench.machine import device_label
    return device_label(bench_device())


def _bf16_note(benchmarks: list[dict]) -> str:
    """Where the dtype axis ran on a CPU that emulates bf16, says the speed target cannot be met there."""
    from bench.machine import BF16_NOTE
    amp = [b["extra_info"] for b in benchmarks if "amp" in (b.get("extra_info", {}).get("params") or {})]
    if not amp:
        return ""
    info = amp[0]
    if info.get("device_kind") == "cuda" or info.get("isa") in ("AMX", "AVX-512 BF16"):
        return f"bf16 runs natively on this device ({info.get('isa')})."
    reduced = " Both dtypes ran at a reduced shape (B=4, C=512) there." if info.get("reduced_shape") else ""
    return f"**ISA {info.get('isa')}: {BF16_NOTE}**{reduced}"


def _threads(benchmarks: list[dict]) -> str:
    found = sorted({str(b["extra_info"]["threads"]) for b in benchmarks if b.get("extra_info", {}).get("threads")})
    return "/".join(found) or os.environ.get("C2F_BENCH_THREADS") or "default"


@dataclass(frozen=True)
class _Run:
    """What the report says about the run as a whole."""
    benchmarks: list[dict]
    notes: list[dict]
    command: str
    date: str
    mode: str          # "quick" or "full"
    device: str
    cpu: bool
    threads: str       # "<n> intra-op thread(s)"
    load: str          # the load average at the start and at the end
    busy_note: str     # the warning of a busy machine, or ""


def _run_facts(out: Path, merged: dict, quick: bool, load: tuple, command: str) -> _Run:
    """The run's facts: the device, the mode (as the bench processes recorded it), threads and load."""
    benchmarks = merged.get("benchmarks", [])
    quick = next((b["extra_info"]["quick"] for b in benchmarks if "quick" in b.get("extra_info", {})), quick)
    device = _device(benchmarks)
    threads = _threads(benchmarks)
    cpu = "cuda" not in device.lower() and not device.startswith("GPU")
    busy = load[0] > 1.0 and cpu
    busy_note = ("**The machine was busy (load average above 1 at the start): CPU timings are inflated and "
                 "scattered, the GEMM fractions most of all (the yardstick and the cases did not see the same "
                 "load). Compare impls within one run, via the ratios, and rerun on an idle machine before quoting "
                 "absolute figures.**" if busy else "")
    return _Run(benchmarks=benchmarks, notes=running.read_notes(out), command=command,
                date=merged.get("datetime") or dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                mode="quick" if quick else "full", device=device, cpu=cpu,
                threads=f"{threads} intra-op thread{'' if threads == '1' else 's'}",
                load=f"load average {load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
                busy_note=busy_note)


def _readme_table(run: _Run) -> str:
    """README_TABLE.md: the run's line, the yardstick GEMM, the summary, compile and dtype tables, and
    the cases that could not run."""
    import torch

    benchmarks, notes = run.benchmarks, run.notes
    failed = tables.notes_lines(notes)
    header = (f"Measured {run.date} on **{run.device}** with `{run.command}` ({run.mode} run; torch "
              f"{torch.__version__}, {run.threads}; {run.load}).")
    return "\n\n".join(x for x in [
        header, f"Yardstick GEMM, same processes and threads, timed around each case: {tables.gemm_line(benchmarks)}. "
        "GEMM fraction (minimal) = the FLOPs of the case's minimal algebra (formulas under the table) / its median "
        "time / that GEMM's throughput; (counted) uses the FLOPs the implementation dispatches (FlopCounterMode); "
        "memory-bound mixup cases have almost no FLOPs.", run.busy_note,
        tables.readme_table(benchmarks, notes), "torch.compile(c2f) beside eager c2f:",
        tables.compile_table(benchmarks, notes), "bf16 autocast against fp32 (c2f):",
        tables.dtype_table(benchmarks, notes), _bf16_note(benchmarks),
        ("Could not run:\n" + "\n".join(failed)) if failed else ""] if x)


def _files_table(merged: dict) -> str:
    """One row per bench file: its status, cases, seconds, and its first failures and xfails."""
    lines = ["| file | status | cases | seconds | failures and xfails |", "|---|---|---|---|---|"]
    for f in merged.get("files", []):
        fails = "<br>".join(f.get("failures", [])[:8]) or "-"
        lines.append(f"| {f['file']} | {f['status']} | {f.get('cases', 0)} | {f['seconds']} | {fails} |")
    return "\n".join(lines)


def _report_preamble(run: _Run, seconds: float) -> str:
    """REPORT.md's title, the run's line and how the figures were measured."""
    import torch
    import triton

    tracker = "CUDA allocator; the driver's view from torch.cuda.device_memory_used beside it" if not run.cpu else \
        "CPU live-tensor tracker, bench/memtrack.py, c2f's custom ops expanded"
    timer = "CUDA events" if not run.cpu else "perf_counter"
    return f"""# c2f performance report

Generated {run.date} by `{run.command}` ({run.mode} run, {seconds:.0f} s in total).
Device: **{run.device}**. torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()},
{run.threads} in the bench processes; {run.load}
(other processes on a 2-core machine inflate and scatter CPU timings: compare impls within one run, via the ratios).

{run.busy_note}

Times are medians over the timed rounds ({timer}; pytest-benchmark, `benchmark.pedantic`), after a warmup
(in quick mode the untimed measuring run, which runs the same step, is the warmup);
peak live bytes are the high-water mark of tensors allocated during one forward + backward ({tracker});
saved-for-backward bytes are what autograd keeps from the forward. Each case runs c2f, the reference
(`c2f.reference`) and, where it applies, `torch.compile` of either on the same inputs in the same run.
Compile times are cold: each report run starts with an empty Inductor cache (`<out>/bench/inductor_cache`).
**GEMM fraction (minimal)**: the FLOPs of the case's minimal algebra (`bench/algebra.py`: only the products the
math cannot do without, named per case under the README table) over its median time, as a fraction of the
yardstick GEMM described next; "GFLOP/s (minimal)" is that rate.
**GEMM fraction**: the case's FLOPs (FlopCounterMode, inside c2f's custom ops too) over its median time,
as a fraction of the yardstick GEMM's throughput, timed in the same process with the same threads right
before and right after the case's rounds ({tables.gemm_line(run.benchmarks)}). It measures how close a
GEMM-bound step comes to the machine's GEMMs; the mixup cases are memory-bound and have almost no FLOPs,
so theirs is not their yardstick. **Aten ops / step**: ops dispatched by one forward + backward
(a TorchDispatchMode counter below autograd, custom ops expanded; on a GPU each is about one kernel launch).
"""


def _report_sections(out: Path, run: _Run, merged: dict, static: dict, readme: str) -> str:
    """REPORT.md's sections after the preamble: files, summary, cases, sweeps (with their plots written
    into ``out``), the static check, bytes moved and the roofline."""
    from bench import roofline
    from bench.plots import sweep_plotter

    benchmarks = run.benchmarks
    return f"""## Bench files

{_files_table(merged)}

## Summary (README table)

{readme}

## Cases

{tables.cases_table(benchmarks) if benchmarks else 'No benchmark results.'}

## Sweeps

{tables.sweep_tables(benchmarks, sweep_plotter(out)) or 'No swept cases.'}

## Static GPU check (no GPU needed)

{inspect_section(static)}

## Bytes moved (Triton interpreter trace)

{bytes_section(out, static)}

## Roofline projections (A100, H100, RTX 4090)

{roofline.markdown()}

Note: the fused attention rows assume the key projection folded into the queries for every head count;
at 16 heads that fold multiplies the score FLOPs by h, which is why the projection is only worth it
below about C / P + 1 = 7 heads.
"""


def write_report(out: Path, merged: dict, static: dict, quick: bool, started: float, load: tuple,
                 command: str) -> Path:
    """Writes ``<out>/README_TABLE.md``, ``<out>/REPORT.md`` and the sweeps' plots; returns REPORT.md's path.

    ``merged``: the merged benchmark.json (with its per-file statuses); ``static``: the inspect and
    bytes-moved statuses; ``started``: when the run began (``time.time()``); ``load``: the load averages
    at the start.
    """
    run = _run_facts(out, merged, quick, load, command)
    readme = _readme_table(run)
    (out / "README_TABLE.md").write_text(readme + "\n")
    report = out / "REPORT.md"
    report.write_text(_report_preamble(run, time.time() - started) + "\n" + _report_sections(
        out, run, merged, static, readme))
    return report


def _static(out: Path, args, quick: bool, started: float) -> dict[str, Any]:
    path = out / "static_status.json"
    if args.skip_static:
        return json.loads(path.read_text()) if path.exists() else {}
    static = running.run_inspect(out, time.time() + args.inspect_budget, fresh=args.fresh_static)
    static.update(running.run_bytes_moved(out, quick, max(started + args.budget, time.time() + 120)))
    path.write_text(json.dumps(static, default=str))
    return static


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="thin sweeps, 3 rounds (default without CUDA)")
    speed.add_argument("--full", action="store_true", help="every sweep point (default with CUDA)")
    parser.add_argument("--files", nargs="+", default=None, help="bench files to run (default: bench/bench_*.py)")
    parser.add_argument("--skip-bench", action="store_true", help="reuse <out>/benchmark.json")
    parser.add_argument("--skip-static", action="store_true", help="reuse <out>/static_status.json and the rest")
    parser.add_argument("--fresh-static", action="store_true", help="recompile even if <out>/inspect.json is current")
    parser.add_argument("--threads", default="auto",
                        help="torch intra-op threads in the bench processes: a number, or 'auto' (default): "
                             "1 when the load average is above 1 at the start, else torch's own")
    parser.add_argument("--budget", type=float, default=600.0,
                        help="seconds for the benches and the bytes trace (default 600)")
    parser.add_argument("--inspect-budget", type=float, default=480.0,
                        help="seconds for the static compile when its cached result is stale (default 480)")
    args = parser.parse_args(argv)

    import torch
    quick = args.quick or (not args.full and not torch.cuda.is_available())
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.mkdir(parents=True, exist_ok=True)
    started, load = time.time(), os.getloadavg()
    busy = load[0] > 1.0 and not torch.cuda.is_available()
    if args.threads == "auto":
        # Two intra-op threads stall on each other whenever another process holds a core: on a busy
        # 2-core machine a 2 ms op sequence measured 100 ms. One thread keeps the timings meaningful.
        if busy:
            os.environ["C2F_BENCH_THREADS"] = "1"
    else:
        os.environ["C2F_BENCH_THREADS"] = str(int(args.threads))
    if busy:
        print(f"WARNING load average {load[0]:.1f}: other processes share this machine's cores; CPU timings "
              f"will be slow and scattered (bench threads: {os.environ.get('C2F_BENCH_THREADS', 'default')})",
              flush=True)
    bytes_share = 0.0 if args.skip_static else 150.0  # the interpreter trace, after the benches

    if args.skip_bench and (out / "benchmark.json").exists():
        merged = json.loads((out / "benchmark.json").read_text())
    else:
        # The smoke case only proves the pipeline: it goes last, where a short budget costs least; the
        # emulated-bf16 dtype axis just before it.
        files = [Path(f).resolve() for f in args.files] if args.files else sorted(
            (ROOT / "bench").glob("bench_*.py"), key=lambda p: (p.stem == "bench_smoke", p.stem == "bench_amp", p.name))
        merged = running.run_benches(out, files, quick, started + args.budget - bytes_share)
    static = _static(out, args, quick, started)
    command = "python -m bench.report " + " ".join(argv) if argv else "python -m bench.report"
    report = write_report(out, merged, static, quick, started, load, command)
    print(f"wrote {report} and {out / 'README_TABLE.md'} in {time.time() - started:.0f} s")
    for f in merged.get("files", []):
        if f["status"] != "ok":
            print(f"WARNING {f['file']}: {f['status']} (see {out / f.get('log', '')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
