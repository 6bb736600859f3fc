"""The GPU verdict in one command: correctness, speed and memory of every fused op at the production shapes.

    python -m bench.gpu --out DIR [--budget SECONDS]      # a CUDA machine: compiled Triton kernels
    python -m bench.gpu --smoke --out DIR                 # no GPU: tiny shapes, Triton's interpreter

Needs torch and triton only (c2f installed with ``pip install --no-deps --no-build-isolation -e .``). Every
case of ``bench.gpu_cases.CASES`` runs at every precision (fp32 with "ieee" and with "tf32" dots, bf16), in
phases, the most informative first, each phase case by case:

1. check: fused against ``c2f.reference`` (float64 truth, the reference in the case's precision as the
   baseline of ``tests/parity.py``'s rule), every output and gradient; fp32-ieee for every op first,
   then fp32-tf32, then bf16;
2. time: fused and reference forward + backward (CUDA events, median of repeats after warm-up), the peak
   memory of each (``max_memory_allocated``, reset per step), achieved GB/s and TFLOP/s of the fused step
   against the datasheet and the yardsticks measured at the start, and ``bench.roofline``'s prediction;
3. compile: ``torch.compile(reference)``, first call (compile) and steady state.

Before each case the remaining budget is checked against the case's estimated cost (a prior per phase,
scaled by what the phase's finished cases took); what would not fit is recorded as skipped. After every
case ``verdict.json`` is rewritten atomically, so a run cut short leaves a valid file; a watchdog writes
it and exits if one case hangs past the budget plus ``--grace``. At the end ``verdict.md`` (one table)
is written and printed. Exit code 0 when every case that ran passed, 1 otherwise.
"""
from __future__ import annotations

import time

_STARTED = time.perf_counter()        # the budget counts from here, imports of torch and c2f included

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from .gpu_report import JSON_NAME, MD_NAME, ROOT, markdown, write_json  # noqa: E402
from .gpu_run import Run  # noqa: E402  (torch is imported when a Run starts, after _environment)

__all__ = ["main", "Run", "parse_args", "write_json", "markdown", "JSON_NAME", "MD_NAME"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for verdict.json and verdict.md")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 420; 240 with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes; without CUDA the kernels run under Triton's interpreter")
    parser.add_argument("--case", action="append", default=[],
                        help="only this case, or the cases this pattern matches ('head_*'; repeatable)")
    parser.add_argument("--precision", action="append", default=[],
                        help="only this precision (fp32-ieee, fp32-tf32, bf16) or pattern ('fp32-*'; repeatable)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend for the reference (default inductor; aot_eager with --smoke)")
    parser.add_argument("--grace", type=float, default=40.0,
                        help="seconds past the budget before the watchdog writes what is done and exits")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 240.0 if args.smoke else 420.0
    return args


def _environment(smoke: bool) -> None:
    """Set before torch, numpy or any c2f kernel module loads: the interpreter (read when a kernel is
    decorated) on a machine without CUDA, one BLAS thread for its small dots, Triton's fp fusion explicit."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if not smoke:
        return
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import torch
    if not torch.cuda.is_available():
        if "numpy" in sys.modules and os.environ.get("OPENBLAS_NUM_THREADS") != "1":
            print("note: numpy was loaded before OPENBLAS_NUM_THREADS=1 could be set", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "1"


def _use_source_tree() -> None:
    """Where pip could not install c2f (``--no-build-isolation`` with a setuptools older than 70.1 and no
    ``wheel``: "invalid command 'bdist_wheel'"), the verdict runs from this checkout all the same: c2f from
    ./c2f (on the path when run from the repository root) and c2f.kernels from ./kernels, as pyproject.toml
    maps them."""
    import importlib.util
    if str(ROOT) not in sys.path and importlib.util.find_spec("c2f") is None:
        sys.path.insert(0, str(ROOT))
    import c2f
    if importlib.util.find_spec("c2f.kernels") is not None:
        return
    spec = importlib.util.spec_from_file_location("c2f.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["c2f.kernels"] = kernels
    spec.loader.exec_module(kernels)
    c2f.kernels = kernels
    print(f"note: c2f is not installed here; running from the source tree {ROOT}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _environment(args.smoke)
    _use_source_tree()
    import torch
    if not args.smoke and not torch.cuda.is_available():
        print("python -m bench.gpu needs a CUDA device; without one run it with --smoke (tiny shapes under "
              "Triton's interpreter)", file=sys.stderr)
        return 2
    if args.smoke and not torch.cuda.is_available():
        # The interpreter runs one program at a time: a second intra-op thread buys the reference little and,
        # on a shared machine, makes every op wait on a busy core for milliseconds.
        torch.set_num_threads(1)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke else "inductor"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.started = _STARTED
    run = Run(args, argv)
    timer = run.watchdog(args.grace)
    try:
        return run.run()
    except KeyboardInterrupt:
        return run.finish("interrupted (Ctrl-C)")
    finally:
        timer.cancel()


if __name__ == "__main__":
    raise SystemExit(main())
