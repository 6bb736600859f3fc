"""Running the report's parts: the bench files (pytest-benchmark), the static GPU check and the bytes trace.

Every part runs in a subprocess with its output in a log under ``<out>``, within a deadline; a part
that fails or runs out of time is reported and the others go on.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTEST_INI = ROOT / "bench" / "pytest.ini"
# The targets the report's static section shows: the data-centre parts (A100, H100), the consumer part
# most users own (RTX 4090 class, sm_89, 99 KiB of shared memory per block) and AMD's MI300 (gfx942).
STATIC_TARGETS = ("sm_80", "sm_90", "sm_89", "gfx942")

__all__ = ["ROOT", "STATIC_TARGETS", "env", "run_cmd", "run_benches", "run_inspect", "run_bytes_moved",
           "read_notes"]


def env(quick: bool, interpret: bool | None) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out["C2F_BENCH_QUICK"] = "1" if quick else "0"
    if interpret is True:
        out["TRITON_INTERPRET"] = "1"
    elif interpret is False:
        out.pop("TRITON_INTERPRET", None)
    return out


def run_cmd(cmd: list[str], environ: dict, timeout: float, log: Path) -> tuple[int | None, float]:
    """Runs a command with its output in ``log``; returns (exit status or None on timeout, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc: int | None = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    return rc, time.perf_counter() - start


def junit_outcomes(path: Path) -> list[str]:
    """One line per failed, erroring or xfailed case of a JUnit XML file."""
    if not path.exists():
        return []
    lines = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is None or (tag == "skipped" and node.get("type") != "pytest.xfail"):
                continue
            msg = (node.get("message") or "").strip().splitlines()
            lines.append(f"{case.get('name')}: {'xfail' if tag == 'skipped' else tag}: {msg[0][:300] if msg else ''}")
    return lines


def read_notes(out: Path) -> list[dict[str, Any]]:
    """What cases recorded they could not measure (``bench.common.failure_note``)."""
    path = out / "bench" / "notes.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_benches(out: Path, files: list[Path], quick: bool, deadline: float) -> dict[str, Any]:
    """One pytest-benchmark process per file; returns the merged JSON plus per-file status."""
    raw = out / "bench"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "notes.jsonl").unlink(missing_ok=True)
    # torch.compile's first call is reported as its compile time: an empty Inductor cache per report run
    # keeps it cold (a warm cache from an earlier run cut it from 32 s to 5 s for the head step here).
    inductor_cache = raw / "inductor_cache"
    shutil.rmtree(inductor_cache, ignore_errors=True)
    merged: dict[str, Any] = {"benchmarks": [], "files": [], "datetime": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    for i, path in enumerate(files):
        # A fair share of what is left, or more while the files still to come keep a minute each.
        left, remaining = len(files) - i, deadline - time.time()
        budget = min(remaining, max(remaining / left * 1.5, remaining - 60 * (left - 1)))
        stem = path.stem
        jpath, xpath, stream = raw / f"{stem}.json", raw / f"{stem}.xml", raw / f"{stem}.jsonl"
        for p in (jpath, xpath, stream):
            p.unlink(missing_ok=True)
        # bench/pytest.ini collects bench_*.py (python_files); the project's pyproject config is not used.
        cmd = [sys.executable, "-m", "pytest", "-c", str(PYTEST_INI), "--rootdir", str(ROOT),
               str(path.relative_to(ROOT)), "--benchmark-only", f"--benchmark-json={jpath}", f"--junitxml={xpath}",
               "-q"]
        if budget <= 5:
            merged["files"].append({"file": path.name, "status": "skipped: no time left", "seconds": 0})
            continue
        print(f"[bench] {path.name} (budget {budget:.0f} s)", flush=True)
        environ = env(quick, None)
        environ["C2F_BENCH_STREAM"] = str(stream)
        environ["C2F_BENCH_NOTES"] = str(raw / "notes.jsonl")
        environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
        rc, seconds = run_cmd(cmd, environ, budget, raw / f"{stem}.log")
        status = "timeout" if rc is None else ("ok" if rc == 0 else f"exit {rc}")
        entry = {"file": path.name, "status": status, "seconds": round(seconds, 1),
                 "failures": junit_outcomes(xpath), "log": str((raw / f"{stem}.log").relative_to(out))}
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


def _inspect_key(targets: tuple[str, ...], quick: bool) -> str:
    """What the compiled kernels depend on: the kernel sources, the targets and shapes, triton's version."""
    import triton

    digest = hashlib.sha256(f"{triton.__version__} {' '.join(targets)} quick={quick}".encode())
    for path in sorted((ROOT / "kernels").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def run_inspect(out: Path, deadline: float, targets: tuple[str, ...] = STATIC_TARGETS, quick: bool = True,
                fresh: bool = False) -> dict[str, Any]:
    """``python -m c2f.kernels.inspect --arch <targets> [--quick] --json``: one run for every target.

    Its result is kept in ``<out>/inspect.json`` with a key over the kernel sources, the targets and
    triton's version, and reused while the key holds (``fresh`` recompiles anyway): compiling every
    plan takes minutes on 2 cores and its result changes only with the kernels.
    """
    path, key = out / "inspect.json", _inspect_key(targets, quick)
    if path.exists() and not fresh:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and cached.get("exit") is not None:
            cached["reused"] = True
            return cached
    args = ["--arch", *targets, "--jobs", str(os.cpu_count() or 1)] + (["--quick"] if quick else [])
    cmd = [sys.executable, "-m", "c2f.kernels.inspect", *args, "--json", str(out / "inspect_raw.json")]
    print(f"[static] {' '.join(cmd[1:])}", flush=True)
    (out / "inspect_raw.json").unlink(missing_ok=True)
    rc, seconds = run_cmd(cmd, env(quick, False), deadline - time.time(), out / "inspect.log")
    result: dict[str, Any] = {"key": key, "command": "python -m c2f.kernels.inspect " + " ".join(args),
                              "targets": list(targets), "quick": quick, "seconds": round(seconds, 1),
                              "exit": "timeout" if rc is None else rc, "reused": False,
                              "generated": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "kernels": []}
    raw = out / "inspect_raw.json"
    if raw.exists():
        result["kernels"] = json.loads(raw.read_text())["kernels"]
        raw.unlink()
    if rc is not None:  # a timed-out run is not cached: the next report tries again
        path.write_text(json.dumps(result, indent=1))
    return result


def run_bytes_moved(out: Path, quick: bool, deadline: float) -> dict[str, Any]:
    """``TRITON_INTERPRET=1 python -m bench.bytes_moved``, CTAs/SM from the inspect rows of sm_90."""
    print("[static] bytes moved (interpreter)", flush=True)
    cmd = [sys.executable, "-m", "bench.bytes_moved", "--json", str(out / "bytes_moved.json"),
           "--inspect-json", str(out / "inspect.json")] + (["--quick"] if quick else [])
    rc, seconds = run_cmd(cmd, env(quick, True), deadline - time.time(), out / "bytes_moved.log")
    return {"bytes_moved": "timeout" if rc is None else rc, "bytes_seconds": round(seconds, 1)}
