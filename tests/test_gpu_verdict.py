"""``python -m bench.gpu``, the GPU verdict, kept from rotting before a GPU runs it.

The smoke run (tiny shapes; Triton's interpreter where there is no CUDA) goes through the same code paths
as the production run, in a fresh process as a user would start it, and must write the full JSON and the
table. A fused result that is wrong, or that came from the torch-op path instead of the Triton kernels,
must fail its case; a budget too small for the cases must stop cleanly, with the rest recorded as skipped.
"""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu, gpu_cases, gpu_check, gpu_device
from tests.conftest import CUDA

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("case", "dtype", "precision", "fused_ms", "reference_ms", "peak_fused_bytes", "peak_reference_bytes",
            "max_rel_error", "passed", "status", "phases")
PRECISIONS = ("fp32-ieee", "fp32-tf32", "bf16")
OPS = ("attention_h1", "attention_h16", "part_mixup_", "part_mixup_pool_k4", "part_mixup_pool_k32", "head_h1_k4")


def _verdict(tmp_path, *args, timeout=400):
    """Runs ``python -m bench.gpu --smoke --out tmp_path ARGS`` in a fresh process; (exit code, JSON, output)."""
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(tmp_path), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    path = tmp_path / gpu.JSON_NAME
    assert path.exists(), f"no {path}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.returncode, json.loads(path.read_text()), proc.stdout + proc.stderr


def test_smoke_run_writes_the_whole_verdict(tmp_path):
    code, report, output = _verdict(tmp_path)
    assert code == 0, output[-4000:]
    for key in ("device", "torch", "triton", "python", "c2f", "command", "budget_s", "elapsed_s", "cases"):
        assert key in report, key
    assert isinstance(report["device"], dict) and report["device"]["interpreter"] is (not CUDA)
    assert report["finished"] and report["mode"] == "smoke"
    keys = set(report["cases"][0])
    for case in report["cases"]:
        assert set(case) == keys, f"{case['case']}: fields differ from the first case's"
        for field in REQUIRED:
            assert field in case, f"{case.get('case')}: no {field}"
    ran = {(c["case"], c["precision"]): c for c in report["cases"]}
    for op in OPS:
        for precision in PRECISIONS:
            assert (op, precision) in ran, f"no {op} at {precision}"
    for case in report["cases"]:
        assert case["passed"] is not False, f"{case['case']} {case['precision']}: {case['error']}"
        if not CUDA:        # the interpreter gets through every check well within the default budget
            assert case["passed"] is True and case["max_rel_error"] <= case["bound_rel"], case["case"]
            assert case["fused_ops"] and all(k.endswith("[triton]") for k in case["fused_ops"]), case["fused_ops"]
    timed = [c for c in report["cases"] if c["precision"] == "fp32-tf32"]
    if not CUDA:            # on a GPU the kernels' compiles may leave part of the timings to the budget
        assert all(c["fused_ms"] > 0 and c["reference_ms"] > 0 and c["model"]["fused_bytes"] > 0 for c in timed)
        assert all(c["compiled_reference_ms"] is not None for c in timed)
    table = (tmp_path / gpu.MD_NAME).read_text()
    assert "| case | precision |" in table and "| attention_h16 | bf16 |" in table
    assert "| case | precision |" in output          # printed at the end too


def test_tiny_budget_stops_cleanly_with_skipped_cases(tmp_path):
    # 1 s: less than any smoke case is expected to take (2 s at least, before one has run), so every case is
    # skipped whatever the machine's speed (10 s fitted the whole smoke run on a fast CPU).
    code, report, output = _verdict(tmp_path, "--budget", "1", "--no-compile", timeout=120)
    assert code == 0, output[-4000:]
    assert report["finished"] and report["elapsed_s"] < report["budget_s"] + 40     # 40: the watchdog's grace
    skipped = [c for c in report["cases"] if c["status"] == "skipped"]
    assert len(skipped) == len(report["cases"]) == len(gpu_cases.CASES) * len(gpu_cases.PRECISIONS) == 33
    assert all("budget" in c["skipped"] for c in skipped), [c["skipped"] for c in skipped]
    assert all(c["passed"] in (True, None) for c in report["cases"])
    assert report["summary"]["skipped"] == len(skipped)
    assert (tmp_path / gpu.MD_NAME).exists()


def _mixup_case(name="part_mixup_"):
    return next(c for c in gpu_cases.CASES if c.name == name)


def _device():
    return torch.device("cuda" if CUDA else "cpu")


def test_a_wrong_fused_result_fails_its_case(monkeypatch, tmp_path):
    original = gpu_cases.Bundle.step

    def corrupted(self, impl):
        step = original(self, impl)
        if impl != "fused":
            return step
        results = step.results

        def wrong():
            out = results()
            out["out"] = out["out"] + 1e-3 * out["out"].abs().max()
            return out
        return dataclasses.replace(step, results=wrong)

    monkeypatch.setattr(gpu_cases.Bundle, "step", corrupted)
    b = gpu_cases.bundle(_mixup_case(), gpu_cases.PRECISION["fp32-tf32"], gpu_cases.SMOKE, _device())
    verdict = gpu_check.check(b)
    bad = [r["tensor"] for r in verdict["checks"] if not r["passed"]]
    assert verdict["passed"] is False and bad == ["out"], verdict["checks"]

    # The same through the runner: the case is recorded failed with its reason, the JSON stays valid, exit 1.
    args = gpu.parse_args(["--smoke", "--out", str(tmp_path), "--case", "part_mixup_", "--precision", "fp32-tf32",
                           "--no-compile"])
    args.compile_backend = "aot_eager"
    assert gpu.Run(args, []).run() == 1
    report = json.loads((tmp_path / gpu.JSON_NAME).read_text())
    (case,) = report["cases"]
    assert case["passed"] is False and case["status"] == "failed" and "out" in case["error"]
    assert case["fused_ms"] is not None                   # a wrong case is still timed
    assert "failed" in (tmp_path / gpu.MD_NAME).read_text()


def test_a_fused_step_on_the_torch_path_fails(monkeypatch):
    """The verdict is about the Triton kernels: a fused step that ran the torch-op path does not pass."""
    import c2f.part_mixup
    real = c2f.part_mixup.part_mixup_pool
    monkeypatch.setattr(c2f.part_mixup, "part_mixup_pool", lambda *a, backend="auto": real(*a, backend="torch"))
    b = gpu_cases.bundle(_mixup_case("part_mixup_pool_k4"), gpu_cases.PRECISION["fp32-ieee"], gpu_cases.SMOKE,
                         _device())
    verdict = gpu_check.check(b)
    backend = next(r for r in verdict["checks"] if r["tensor"] == "backend")
    assert verdict["passed"] is False and backend["fused"] == ["torch"]


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"), ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA L40S", "L40S"), ("AMD Instinct MI300X", "MI300X"),
    ("NVIDIA GeForce RTX 3090", None)])
def test_datasheet_peaks_by_device_name(name, expected):
    peaks = gpu_device.datasheet_peaks(name)
    assert (peaks.name if peaks else None) == expected


def test_runs_from_the_source_tree_where_c2f_is_not_installed(tmp_path):
    """pip can fail to build c2f on a GPU node (``--no-build-isolation``, an old setuptools without wheel): the
    verdict then loads c2f.kernels from ./kernels. The installed package's finder is taken away to show it."""
    script = ("import sys\n"
              "sys.meta_path = [f for f in sys.meta_path if 'editable' not in (getattr(f, '__module__', '') or '')]\n"
              f"sys.path.insert(0, {str(ROOT)!r})\n"
              "from bench import gpu\n"
              f"raise SystemExit(gpu.main(['--smoke', '--out', {str(tmp_path)!r}, '--case', 'part_mixup_',\n"
              "                           '--precision', 'fp32-ieee', '--no-compile']))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"note: c2f is not installed here; running from the source tree {ROOT}" in proc.stderr
    report = json.loads((tmp_path / gpu.JSON_NAME).read_text())
    assert [c["status"] for c in report["cases"]] == ["passed"]
