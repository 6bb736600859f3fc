"""One command for the whole performance picture: ``python -m bench.report --out results`` (``make bench``).

1. Runs every ``bench/bench_*.py`` with pytest-benchmark, one pytest process per file (a file that fails
   or runs out of time is reported and the others go on), merged into ``<out>/benchmark.json``.
2. The static GPU check (``python -m c2f.kernels.inspect --arch 80 90``, no GPU needed).
3. Bytes moved per kernel, traced under the Triton interpreter (``python -m bench.bytes_moved``).
4. The roofline model (``bench.roofline``).
Then writes ``<out>/REPORT.md``, PNG plots of the sweeps, and ``<out>/README_TABLE.md`` for the README.

Without CUDA the run is quick by default (``C2F_BENCH_QUICK=1``: thinned sweeps, 3 rounds) so that it
stays within 10 minutes on a 2-core CPU; ``--full`` runs every sweep point. On CUDA it is full.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
IMPL_ORDER = ("fused", "reference", "compiled")
BYTES_EXPLAINED = """\
How to read it. *Logical* bytes are what the programs ask for; *compulsory* bytes read every input and
write every output once; the *HBM estimate* lets programs that run in the same wave (132 SMs x CTAs/SM
from the sm_90 inspect row, in grid order, axis 0 fastest) share what they read through L2, and keeps
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


# ---------------------------------------------------------------- running

def _env(quick: bool, interpret: Optional[bool]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["C2F_BENCH_QUICK"] = "1" if quick else "0"
    if interpret is True:
        env["TRITON_INTERPRET"] = "1"
    elif interpret is False:
        env.pop("TRITON_INTERPRET", None)
    return env


def _param_key(params: tuple) -> tuple:
    return tuple((k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))) for k, v in params)


def _case_order(item) -> tuple:
    (name, params), _ = item
    return name, _param_key(params)


def _run(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[Optional[int], float]:
    """Runs a command with its output in ``log``; returns (exit status or None on timeout, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc: Optional[int] = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    return rc, time.perf_counter() - start


def _junit_failures(path: Path) -> list[str]:
    if not path.exists():
        return []
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                msg = (node.get("message") or "").strip().splitlines()
                failures.append(f"{case.get('name')}: {tag}: {msg[0][:300] if msg else ''}")
    return failures


def run_benches(out: Path, files: list[Path], quick: bool, deadline: float) -> dict[str, Any]:
    """One pytest-benchmark process per file; returns the merged JSON plus per-file status."""
    raw = out / "bench"
    raw.mkdir(parents=True, exist_ok=True)
    merged: dict[str, Any] = {"benchmarks": [], "files": []}
    for i, path in enumerate(files):
        # A fair share of what is left, or more while the files still to come keep a minute each.
        left, remaining = len(files) - i, deadline - time.time()
        budget = min(remaining, max(remaining / left * 1.5, remaining - 60 * (left - 1)))
        stem = path.stem
        jpath, xpath, stream = raw / f"{stem}.json", raw / f"{stem}.xml", raw / f"{stem}.jsonl"
        for p in (jpath, xpath, stream):
            p.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", str(path.relative_to(ROOT)), "--benchmark-only",
               f"--benchmark-json={jpath}", f"--junitxml={xpath}", "-q", "-p", "no:cacheprovider",
               "-o", "addopts="]
        if budget <= 5:
            merged["files"].append({"file": path.name, "status": "skipped: no time left", "seconds": 0})
            continue
        print(f"[bench] {path.name} (budget {budget:.0f} s)", flush=True)
        env = _env(quick, None)
        env["C2F_BENCH_STREAM"] = str(stream)
        rc, seconds = _run(cmd, env, budget, raw / f"{stem}.log")
        status = "timeout" if rc is None else ("ok" if rc == 0 else f"exit {rc}")
        entry = {"file": path.name, "status": status, "seconds": round(seconds, 1),
                 "failures": _junit_failures(xpath), "log": str((raw / f"{stem}.log").relative_to(out))}
        if jpath.exists():
            data = json.loads(jpath.read_text())
            merged.setdefault("machine_info", data.get("machine_info"))
            merged.setdefault("commit_info", data.get("commit_info"))
            found = data.get("benchmarks", [])
        elif stream.exists():  # cut off: keep the cases that finished
            found = [json.loads(line) for line in stream.read_text().splitlines() if line.strip()]
            entry["status"] += f" (kept {len(found)} finished cases)"
        else:
            found = []
        for b in found:
            b["file"] = path.name
        merged["benchmarks"] += found
        entry["cases"] = sum(1 for b in merged["benchmarks"] if b["file"] == path.name)
        merged["files"].append(entry)
        print(f"[bench] {path.name}: {status} in {seconds:.0f} s, {entry['cases']} cases", flush=True)
    (out / "benchmark.json").write_text(json.dumps(merged, indent=1, default=str))
    return merged


def run_static(out: Path, quick: bool, deadline: float) -> dict[str, Any]:
    """kernels.inspect for sm_80 and sm_90 side by side, then the bytes-moved trace."""
    status: dict[str, Any] = {}
    procs = []
    for arch in (80, 90):
        log = open(out / f"inspect_sm{arch}.log", "w")
        cmd = [sys.executable, "-m", "c2f.kernels.inspect", "--arch", str(arch), "--jobs", "1",
               "--json", str(out / f"inspect_sm{arch}.json")]
        procs.append((arch, subprocess.Popen(cmd, cwd=ROOT, env=_env(quick, False), stdout=log,
                                             stderr=subprocess.STDOUT), log))
    start = time.perf_counter()
    for arch, proc, log in procs:
        try:
            proc.wait(timeout=max(deadline - time.time(), 1))
            status[f"inspect_sm{arch}"] = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status[f"inspect_sm{arch}"] = "timeout"
        log.close()
    status["inspect_seconds"] = round(time.perf_counter() - start, 1)
    kernels, errors = [], []
    for arch in (80, 90):
        p = out / f"inspect_sm{arch}.json"
        if p.exists():
            data = json.loads(p.read_text())
            kernels += data["kernels"]
    (out / "inspect.json").write_text(json.dumps({"kernels": kernels, "errors": errors}, indent=1))

    print("[static] bytes moved (interpreter)", flush=True)
    cmd = [sys.executable, "-m", "bench.bytes_moved", "--json", str(out / "bytes_moved.json"),
           "--inspect-json", str(out / "inspect.json")] + (["--quick"] if quick else [])
    rc, seconds = _run(cmd, _env(quick, True), deadline - time.time(), out / "bytes_moved.log")
    status["bytes_moved"] = "timeout" if rc is None else rc
    status["bytes_seconds"] = round(seconds, 1)
    return status


# ---------------------------------------------------------------- tables and plots

def _cases(benchmarks: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{(case name, params as a sorted tuple): {impl: benchmark}}."""
    cases: dict[tuple, dict[str, dict]] = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        key = (info.get("case", b.get("group") or b["name"]), tuple(sorted((info.get("params") or {}).items())))
        cases.setdefault(key, {})[info.get("impl", b["name"])] = b
    return cases


def _ms(b: dict, stat: str = "median") -> float:
    return b["stats"][stat] * 1e3


def _mib(b: dict, key: str) -> Optional[float]:
    v = b.get("extra_info", {}).get(key)
    return None if v is None else v / MiB


def _fmt(v: Optional[float], spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def _params(params: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in params) or "-"


def cases_table(benchmarks: list[dict]) -> str:
    lines = ["| case | params | impl | median (ms) | IQR (ms) | stddev (ms) | rounds | peak live (MiB) | "
             "saved for bwd (MiB) | GFLOP | speedup vs reference | peak / reference peak | dtype |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, params), impls in sorted(_cases(benchmarks).items(), key=_case_order):
        ref = impls.get("reference")
        for impl in sorted(impls, key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else 9):
            b, info = impls[impl], impls[impl].get("extra_info", {})
            t_ratio = p_ratio = "-"
            if ref is not None and impl != "reference":
                t_ratio = f"{_ms(ref) / _ms(b):.2f}x" if _ms(b) else "n/a"
                pf, pr = info.get("peak_bytes"), ref.get("extra_info", {}).get("peak_bytes")
                p_ratio = f"{pf / pr:.2f}" if pf is not None and pr else "n/a"
            flops = info.get("flops")
            lines.append(f"| {name} | {_params(params)} | {impl} | {_ms(b):.2f} | {_ms(b, 'iqr'):.2f} | "
                         f"{_ms(b, 'stddev'):.2f} | {b['stats']['rounds']} | {_fmt(_mib(b, 'peak_bytes'))} | "
                         f"{_fmt(_mib(b, 'saved_bytes'))} | {_fmt(None if flops is None else flops / 1e9, '.2f')} | "
                         f"{t_ratio} | {p_ratio} | {info.get('dtype', '')} |")
    return "\n".join(lines)


def sweeps(benchmarks: list[dict]) -> dict[tuple, dict[str, list[tuple[Any, dict]]]]:
    """{(case, sweep param, other params): {impl: [(x, benchmark), ...] sorted by x}} for swept cases."""
    out: dict[tuple, dict[str, list]] = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        var, params = info.get("sweep"), info.get("params") or {}
        if not var or var not in params:
            continue
        rest = tuple(sorted((k, v) for k, v in params.items() if k != var))
        out.setdefault((info.get("case"), var, rest), {}).setdefault(info.get("impl"), {})[params[var]] = b
    return {key: {impl: sorted(points.items(), key=lambda xb: xb[0]) for impl, points in series.items()}
            for key, series in out.items()}


def sweep_tables_and_plots(benchmarks: list[dict], out: Path) -> tuple[str, list[str]]:
    parts, plots = [], []
    for (case, var, rest), series in sorted(sweeps(benchmarks).items(), key=lambda kv: str(kv[0])):
        impls = sorted(series, key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else 9)
        xs = sorted({x for impl in impls for x, _ in series[impl]})
        title = f"{case} vs {var}" + (f" ({_params(rest)})" if rest else "")
        head = "| " + var + " | " + " | ".join(f"{i} ms | {i} peak MiB" for i in impls) + " |"
        lines = [f"#### {title}", "", head, "|" + "---|" * (1 + 2 * len(impls))]
        for x in xs:
            cells = []
            for impl in impls:
                b = dict(series[impl]).get(x)
                cells += ["-", "-"] if b is None else [f"{_ms(b):.2f}", _fmt(_mib(b, "peak_bytes"))]
            lines.append(f"| {x} | " + " | ".join(cells) + " |")
        png = _plot(case, var, rest, series, impls, out)
        if png:
            plots.append(png)
            lines += ["", f"![{title}]({png})"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts), plots


def _plot(case: str, var: str, rest: tuple, series: dict, impls: list[str], out: Path) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"fused": ("tab:blue", "o"), "reference": ("tab:red", "s"), "compiled": ("tab:green", "^")}
    for impl in impls:
        color, marker = styles.get(impl, ("tab:gray", "x"))
        xs = [x for x, _ in series[impl]]
        med = [_ms(b) for _, b in series[impl]]
        q1 = [b["stats"]["q1"] * 1e3 for _, b in series[impl]]
        q3 = [b["stats"]["q3"] * 1e3 for _, b in series[impl]]
        ax_t.plot(xs, med, marker=marker, color=color, label=impl)
        ax_t.fill_between(xs, q1, q3, color=color, alpha=0.2)
        peaks = [(x, _mib(b, "peak_bytes")) for x, b in series[impl] if _mib(b, "peak_bytes") is not None]
        if peaks:
            ax_m.plot([x for x, _ in peaks], [p for _, p in peaks], marker=marker, color=color, label=impl)
    for ax, ylabel in ((ax_t, "median time (ms), IQR band"), (ax_m, "peak live tensors (MiB)")):
        ax.set_xlabel(var)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    device = next(iter(series.values()))[0][1].get("extra_info", {}).get("device", "")
    fig.suptitle(f"{case} vs {var}" + (f" ({_params(rest)})" if rest else "") + f" - {device}", fontsize=10)
    fig.tight_layout()
    name = f"{case}_vs_{var}" + "".join(f"_{k}{v}" for k, v in rest) + ".png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def readme_table(benchmarks: list[dict], device: str, date: str, mode: str) -> str:
    """The README's results table: one row per case at its headline size, fused against the others."""
    lines = [f"Measured {date} on {device} ({mode} run of `make bench`; full report in results/REPORT.md).", "",
             "| case | params | fused (ms) | reference (ms) | speedup | compiled (ms, speedup) "
             "| fused / reference peak memory |",
             "|---|---|---|---|---|---|---|"]
    cases = _cases(benchmarks)
    # Headline rows: the sizes the issues set targets at, i.e. the cases also run against
    # torch.compile, and the cases outside any sweep; a case that exists only in a sweep shows every point.
    headline = {k: v for k, v in cases.items()
                if "compiled" in v or not any(b["extra_info"].get("sweep") for b in v.values())}
    for name in {n for n, _ in cases} - {n for n, _ in headline}:
        headline.update({k: v for k, v in cases.items() if k[0] == name})
    for (name, params), impls in sorted(headline.items(), key=_case_order):
        if name.startswith("smoke") or "fused" not in impls or "reference" not in impls:
            continue
        f, r, c = impls["fused"], impls["reference"], impls.get("compiled")
        pf, pr = f["extra_info"].get("peak_bytes"), r["extra_info"].get("peak_bytes")
        compiled = "-" if c is None else f"{_ms(c):.1f} ({_ms(c) / _ms(f):.2f}x)"
        peak = _fmt(pf / pr if pf is not None and pr else None, ".2f")
        lines.append(f"| {name} | {_params(params)} | {_ms(f):.1f} | {_ms(r):.1f} | {_ms(r) / _ms(f):.2f}x | "
                     f"{compiled} | {peak} |")
    return "\n".join(lines)


def inspect_section(out: Path, status: dict) -> str:
    path = out / "inspect.json"
    if not path.exists():
        return "Not run."
    from c2f.kernels.inspect import KernelReport, format_table
    data = json.loads(path.read_text())
    reports = [KernelReport(**r) for r in data["kernels"]]
    reports.sort(key=lambda r: (r.op, r.kernel, r.target))
    spilled = [r for r in reports if r.ok and r.spills]
    failed = [r for r in reports if not r.ok]
    lines = [f"`python -m c2f.kernels.inspect --arch 80 90` (exit status sm_80: {status.get('inspect_sm80')}, "
             f"sm_90: {status.get('inspect_sm90')}; {status.get('inspect_seconds')} s). Registers and spills from "
             "ptxas -v, shared memory from the compiled kernel's metadata, tensor cores from the SASS "
             "(HMMA: mma.sync on sm_80/sm_90; HGMMA: wgmma on sm_90). CTAs/SM is the occupancy bound from "
             "registers, shared memory and warps.", ""]
    lines.append(f"**{len(reports)} compiles, {len(failed)} failed, {len(spilled)} spill.**"
                 + (" Spilling: " + ", ".join(f"{r.kernel} {r.target} ({r.spill_stores} B)" for r in spilled)
                    if spilled else ""))
    for e in data.get("errors", []):
        lines.append(f"- ERROR {e}")
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
    lines = [f"`TRITON_INTERPRET=1 python -m bench.bytes_moved` ({status.get('bytes_seconds')} s).{cut} "
             "MB = 1e6 bytes at B=64, fp32.", "", markdown(rows), "",
             "Largest wave footprint per launch (all distinct bytes one wave touches at B=64): " + ", ".join(
                 f"{l['kernel']} {l['wave_footprint'] / 1e6:.0f} MB" for r in rows if "launches" in r
                 for l in r["launches"]) + ". The model needs only the tile that programs share (one sample's "
             "map, 1.6 MB) to stay in L2 while its readers run, not the whole footprint.", "", BYTES_EXPLAINED]
    return "\n".join(lines)


def _device_name(benchmarks: list[dict]) -> str:
    for b in benchmarks:
        if b.get("extra_info", {}).get("device"):
            return b["extra_info"]["device"]
    import torch
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_report(out: Path, merged: dict, status: dict, quick: bool, started: float, load: tuple) -> Path:
    import torch
    import triton

    from bench import roofline

    benchmarks = merged.get("benchmarks", [])
    device = _device_name(benchmarks)
    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    mode = "quick" if quick else "full"
    sweeps_md, plots = sweep_tables_and_plots(benchmarks, out)
    (out / "README_TABLE.md").write_text(readme_table(benchmarks, device, date, mode) + "\n")
    file_lines = ["| file | status | cases | seconds | failures |", "|---|---|---|---|---|"]
    for f in merged.get("files", []):
        fails = "<br>".join(f.get("failures", [])[:8]) or "-"
        file_lines.append(f"| {f['file']} | {f['status']} | {f.get('cases', 0)} | {f['seconds']} | {fails} |")
    elapsed = time.time() - started
    busy_note = ("\n**The machine was busy (load average above 1): the CPU timings below are inflated and noisy "
                 "(with 2 intra-op threads, which stall on each other, op-heavy code suffers most; `--threads auto` "
                 "drops to 1 thread when the machine is busy at the start). Rerun on an idle machine before quoting "
                 "them.**\n" if load[0] > 1.0 and "cuda" not in device else "")  # the bench itself loads the end
    threads = os.environ.get("C2F_BENCH_THREADS") or torch.get_num_threads()
    load_end = os.getloadavg()[0]
    tracker = "CUDA allocator, NVML beside it" if "cuda" in device else "CPU live-tensor tracker, bench/memtrack.py"
    text = f"""# c2f performance report

Generated {date} by `python -m bench.report` ({mode} run, {elapsed:.0f} s in total).
Device: **{device}**. torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()},
{threads} intra-op threads in the bench processes; load average {load[0]:.2f} at the start, {load_end:.2f} at the end
(other processes on a 2-core machine inflate and scatter CPU timings: compare impls within one run, via the ratios).
{busy_note}
Times are medians over the rounds after one warmup round (pytest-benchmark, `benchmark.pedantic`);
peak live bytes are the high-water mark of tensors allocated during one step ({tracker}),
saved-for-backward bytes are what autograd keeps from the forward. Each case runs fused, reference
(`c2f.reference`) and, where it applies, `torch.compile(reference)` on the same inputs in the same run.

## Bench files

{chr(10).join(file_lines)}

## Cases

{cases_table(benchmarks) if benchmarks else 'No benchmark results.'}

## Sweeps

{sweeps_md or 'No swept cases.'}

## Static GPU check (no GPU needed)

{inspect_section(out, status)}

## Bytes moved (Triton interpreter trace)

{bytes_section(out, status)}

## Roofline projection (H100 SXM)

{roofline.markdown()}

Note: the fused attention rows assume the key projection folded into the queries for every head count;
at 16 heads that fold multiplies the score FLOPs by h, which is why the projection is only worth it
below about C / P + 1 = 7 heads.
"""
    report = out / "REPORT.md"
    report.write_text(text)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="thin sweeps, 3 rounds (default without CUDA)")
    speed.add_argument("--full", action="store_true", help="every sweep point (default with CUDA)")
    parser.add_argument("--files", nargs="+", default=None, help="bench files to run (default: bench/bench_*.py)")
    parser.add_argument("--skip-bench", action="store_true", help="reuse <out>/benchmark.json")
    parser.add_argument("--skip-static", action="store_true", help="reuse <out>/inspect.json and bytes_moved.json")
    parser.add_argument("--threads", default="auto",
                        help="torch intra-op threads in the bench processes: a number, or 'auto' (default): "
                             "1 when the load average is above 1 at the start, else torch's own")
    parser.add_argument("--budget", type=float, default=560.0, help="seconds for the whole run (default 560)")
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
    static_share = 200.0  # inspect (two archs side by side) + the interpreter trace

    if args.skip_bench and (out / "benchmark.json").exists():
        merged = json.loads((out / "benchmark.json").read_text())
    else:
        # The smoke case only proves the pipeline: it goes last, where a short budget costs least.
        files = [Path(f).resolve() for f in args.files] if args.files else sorted(
            (ROOT / "bench").glob("bench_*.py"), key=lambda p: (p.stem == "bench_smoke", p.name))
        merged = run_benches(out, files, quick, started + args.budget - (0 if args.skip_static else static_share))
    status: dict[str, Any] = {}
    status_path = out / "static_status.json"
    if args.skip_static and status_path.exists():
        status = json.loads(status_path.read_text())
    elif not args.skip_static:
        status = run_static(out, quick, max(started + args.budget, time.time() + static_share))
        status_path.write_text(json.dumps(status))
    report = write_report(out, merged, status, quick, started, load)
    print(f"wrote {report} and {out / 'README_TABLE.md'} in {time.time() - started:.0f} s")
    for f in merged.get("files", []):
        if f["status"] != "ok":
            print(f"WARNING {f['file']}: {f['status']} (see {out / f.get('log', '')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
