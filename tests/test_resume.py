"""Runs a researcher can trust: resume keyed on the run directory given, no overwrite, one writer per run,
verified resume state, no silent NaN, mixed precision, compile, and no host read-back per step."""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from c2f.app import NonFiniteError, ResumeConflict, RunError, TrainConfig, Trainer, devices, resume_config, runs, train
from c2f.app.cli import main
from c2f.app.data import FeatureCache, split_rows, synthesize
from c2f.files import LockedError
from c2f.model_file import safe_load
from tests.tamper import edit_json, flip_bytes, nan_rows

SMALL = dict(num_classes=4, images_per_class=8, num_attributes=6, dim=16, grid=4, num_locations=3,
             test_fraction=0.25, classes_per_genus=1, shard_size=16, progress=False)
FLAGS = ["--batch-size", "4", "--lr", "0.01", "--num-workers", "0", "--no-progress", "--no-plots", "--head",
         "reference", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthesize(str(tmp_path_factory.mktemp("small") / "cache"), **SMALL)


def config(cache, run_dir, **kw):
    base = dict(features=cache, run_dir=str(run_dir), epochs=2, batch_size=4, lr=1e-2, num_workers=0,
                progress=False, plots=False, head="reference", val_fraction=0.25)
    return TrainConfig(**{**base, **kw})


def epochs_of(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln)["epoch"] for ln in f]


def test_resume_default_moved_and_relative_run_dirs(cache, tmp_path, monkeypatch, capsys):
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    assert main(["train", "--features", cache, "--epochs", "3", "--stop-after", "1", *FLAGS]) == 0
    (run_name,) = os.listdir(first / "runs")
    saved = json.load(open(first / "runs" / run_name / "config.json"))
    assert saved["features"] == os.path.abspath(cache) and saved["_run"]["run_dir"] == str(first / "runs" / run_name)
    assert "run_dir" not in saved
    # The default run directory, as typed, from where it was made.
    assert main(["train", "--resume", "--run-dir", os.path.join("runs", run_name), "--stop-after", "1",
                 "--no-progress"]) == 0
    assert epochs_of(first / "runs" / run_name) == [1, 2]
    # Moved, and resumed by a relative path from another working directory.
    shutil.move(str(first / "runs" / run_name), str(tmp_path / "moved"))
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    capsys.readouterr()
    assert main(["train", "--resume", os.path.join("..", "moved"), "--no-progress"]) == 0
    assert epochs_of(tmp_path / "moved") == [1, 2, 3]
    assert "held-out test split" in capsys.readouterr().out
    assert not (first / "runs" / run_name).exists()


def test_resume_refuses_conflicting_flags_and_takes_operational_ones(cache, tmp_path, capsys):
    run = str(tmp_path / "run")
    train(config(cache, run, epochs=3, stop_after=1))
    with pytest.raises(ResumeConflict) as e:
        resume_config(run, dict(lr=0.1, stage="fine", num_workers=1))
    assert [c[0] for c in e.value.conflicts] == ["lr", "stage"]
    capsys.readouterr()
    assert main(["train", "--resume", run, "--lr", "0.1", "--stage", "fine", "--num-workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr 0.1 (the run has 0.01)" in err and "--stage fine" in err
    assert "--num-workers" not in err
    assert epochs_of(run) == [1]                              # nothing ran
    # Equal values and operational flags are fine.
    assert main(["train", "--resume", run, "--lr", "0.01", "--stage", "joint", "--num-workers", "0",
                 "--stop-after", "1", "--no-progress", "--verify", "size"]) == 0
    assert epochs_of(run) == [1, 2]
    with pytest.raises(Exception, match="trained 2 epochs already"):
        train(resume_config(run, dict(epochs=1)), resume=True)


def test_resume_checks_the_cache_by_its_manifest(cache, tmp_path, capsys):
    run = str(tmp_path / "run")
    copy = str(tmp_path / "cache-copy")
    shutil.copytree(cache, copy)
    train(config(copy, run, epochs=2, stop_after=1))
    capsys.readouterr()
    moved = str(tmp_path / "cache-moved")
    shutil.move(copy, moved)
    assert main(["train", "--resume", run, "--no-progress"]) == 2
    assert "--features" in capsys.readouterr().err
    other = synthesize(str(tmp_path / "other"), **{**SMALL, "seed": 1})
    assert main(["train", "--resume", run, "--features", other, "--no-progress"]) == 2
    assert "is not the cache" in capsys.readouterr().err
    assert main(["train", "--resume", run, "--features", moved, "--no-progress"]) == 0
    assert epochs_of(run) == [1, 2]
    assert json.load(open(os.path.join(run, "config.json")))["features"] == moved


def test_an_existing_run_is_never_overwritten(cache, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(cache, run, epochs=1))
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    with pytest.raises(RunError, match="already holds a run"):
        train(config(cache, run, epochs=1))
    capsys.readouterr()
    assert main(["train", "--features", cache, "--run-dir", str(run), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "Traceback" not in err
    assert {name: (run / name).read_bytes() for name in os.listdir(run)} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".c2f-lock").write_text("")                        # a lock file alone is not a run
    train(config(cache, empty, epochs=1))                       # an empty directory is fine
    assert (empty / "best.pt").is_file()


@pytest.fixture
def nan_cache(cache, tmp_path):
    """The small cache with one training row's features set to NaN; returns (directory, that row)."""
    out = str(tmp_path / "nan-cache")
    shutil.copytree(cache, out)
    fc = FeatureCache(out)
    train_rows, _, _ = split_rows(fc.labels, fc.is_train, 0.0, 0)
    row = int(train_rows[5])
    shard = fc.manifest["shards"][int(np.searchsorted(fc.starts, row, side="right") - 1)]
    path = os.path.join(out, shard["file"])
    data = np.load(path)
    data[row - shard["start"]] = np.nan
    np.save(path, data)
    return out, row


def test_a_nan_feature_stops_training_before_anything_is_checkpointed(nan_cache, tmp_path, capsys):
    cache, row = nan_cache
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as e:
        train(config(cache, run, val_fraction=0.0, verify="size"))
    message = str(e.value)
    assert "non-finite loss at epoch 1, step" in message and str(row) in message and "--skip-nonfinite" in message
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()
    capsys.readouterr()
    assert main(["train", "--features", cache, "--run-dir", str(tmp_path / "cli"), "--verify", "size",
                 "--val-fraction", "0", *FLAGS[:-2]]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "non-finite loss at epoch 1" in err


def test_skip_nonfinite_skips_and_counts_the_batches(nan_cache, tmp_path):
    cache, _ = nan_cache
    run = tmp_path / "run"
    train(config(cache, run, val_fraction=0.0, verify="size", skip_nonfinite=True))
    recs = [json.loads(ln) for ln in open(run / "metrics.jsonl")]
    assert [r["skipped_batches"] for r in recs] == [1, 1]      # 24 rows, batches of 4: the row is in one
    assert all(np.isfinite(r["train_reg"]) and np.isfinite(r["train_ce"]) for r in recs)
    for v in safe_load(str(run / "best.pt"))["model"].values():
        assert torch.isfinite(v).all()


class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Host read-backs (item, bool, equal) issued by c2f's own training loop, by the calling function."""
    SYNCS = {"aten._local_scalar_dense.default", "aten.equal.default", "aten.is_nonzero.default"}
    LOOP = (os.path.join("c2f", "app", "epoch.py"), os.path.join("c2f", "app", "trainer.py"))
    MODE_WRAPPERS = ("_python_dispatch.py", "eval_frame.py", "_compile.py")   # torch's frames around this mode

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.SYNCS:
            # The innermost caller: torch's own reads (the optimizer's CPU step counters, the loader's seed)
            # are torch's; an .item() or bool() written in c2f's loop is the loop's.
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.endswith(self.MODE_WRAPPERS):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.endswith(self.LOOP):
                self.sites.append(frame.f_code.co_name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("skip", [False, True])
def test_losses_are_read_back_once_per_interval_not_per_step(cache, tmp_path, skip):
    trainer = Trainer(config(cache, tmp_path / "run", log_every=3, skip_nonfinite=skip, stage="attention"))
    flushes = []
    real = trainer._flush
    trainer._flush = lambda acc, totals, bar: (flushes.append(acc.steps), real(acc, totals, bar))
    try:
        with _SyncCounter() as counter:
            trainer.train_epoch()
    finally:
        trainer.close()
    steps = len(trainer.train_loader)
    assert steps == 4 and flushes == [3, 1]                    # every 3 steps and at the epoch's end
    # Read-backs happen in _flush through one tolist (not a dispatched op): none per step, unless skipping
    # non-finite batches, which must decide on the host each step.
    assert counter.sites == (["_step"] * steps if skip else [])


def test_amp_auto_follows_the_cpu(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: fpu sse avx512f avx512_bf16\n")
    assert devices.cpu_has_fast_bf16(str(info))
    info.write_text("flags\t: fpu sse avx2\n")
    assert not devices.cpu_has_fast_bf16(str(info))
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert devices.resolve_amp("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert devices.resolve_amp("auto", torch.device("cpu")) == "off"
    assert devices.resolve_amp("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.parametrize("head", ["reference", "fused"])
def test_bf16_autocast_trains(cache, tmp_path, head):
    result = train(config(cache, tmp_path / "run", epochs=1, amp="bf16", head=head))
    assert np.isfinite(result["test"]["reg"]) and result["test"]["n"] == 8


def test_fp16_keeps_the_gradient_scaler_across_resume(cache, tmp_path):
    run = str(tmp_path / "run")
    train(config(cache, run, amp="fp16", stop_after=1))
    scaler = safe_load(os.path.join(run, "last.pt"))["scaler"]
    assert scaler["scale"] > 0
    trainer = Trainer(resume_config(run, {}), resume=True)
    try:
        assert trainer.scaler.get_scale() == scaler["scale"]
        trainer.fit()
    finally:
        trainer.close()
    assert epochs_of(run) == [1, 2]


def test_compile_runs_a_step(cache, tmp_path):
    """--compile plumbing: the reference head through torch.compile (aot_eager: no C++ toolchain needed)."""
    result = train(config(cache, tmp_path / "run", epochs=1, compile=True, compile_backend="aot_eager"))
    assert np.isfinite(result["test"]["reg"])


def test_compile_fused_head_with_inductor(cache, tmp_path):
    """The fused head's registered ops compile with the default backend inside the training loop."""
    result = train(config(cache, tmp_path / "run", epochs=1, compile=True, head="fused"))
    assert np.isfinite(result["test"]["reg"])


# ------------------------------------------------------------------------------ one writer per run

RUN_FILES = {".c2f-lock", "config.json", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt", "best.safetensors",
             "final.json"}
SUBPROCESS_TIMEOUT = 240


# `c2f ARGS` in a process that has imported c2f and torch, then waits for the file GO to exist: processes
# started so run their commands within milliseconds of each other, not a second apart.
STARTER = """import os, sys, time
from c2f.app.cli import main
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
sys.exit(main(sys.argv[2:]))"""


def stop(proc: subprocess.Popen) -> None:
    """Kills ``proc`` if it runs and closes its pipes without waiting for them (a forked child may hold them)."""
    proc.kill()
    proc.wait(30)
    proc.stdout.close()
    proc.stderr.close()


def start_cli(go: str, *args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", STARTER, go, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    return proc


def test_two_runs_into_one_directory_at_once(cache, tmp_path):
    """The issue's `for lr in 0.003 0.01; do c2f train ... --run-dir runs/dup & done; wait`: one run writes the
    directory, the other exits 2 in one line having written nothing; the winner's files are its own."""
    run, go = tmp_path / "dup", str(tmp_path / "go")
    procs = {}
    try:
        for lr in ("0.003", "0.01"):
            procs[lr] = start_cli(go, "train", "--features", cache, "--run-dir", str(run), "--epochs", "2", *FLAGS,
                                  "--lr", lr)
        open(go, "w").close()
        results = {lr: (p.wait(SUBPROCESS_TIMEOUT), p.stderr.read()) for lr, p in procs.items()}
    finally:
        for p in procs.values():
            stop(p)
    assert sorted(code for code, _ in results.values()) == [0, 2], results
    (winner,) = [lr for lr, (code, _) in results.items() if code == 0]
    (loser,) = [lr for lr, (code, _) in results.items() if code == 2]
    err = results[loser][1].strip()
    assert len(err.splitlines()) == 1 and ("is in use" in err or "already holds a run" in err), err
    assert set(os.listdir(run)) == RUN_FILES                   # no file (nor temporary file) of the loser's
    assert epochs_of(run) == [1, 2]
    assert json.load(open(run / "config.json"))["lr"] == float(winner)
    assert safe_load(str(run / "last.pt"))["config"]["lr"] == float(winner)


def test_a_running_holder_is_named_and_its_lock_dies_with_it(cache, tmp_path, capsys):
    """While a run trains, a resume of its directory exits 2 naming its pid and host; once the holder is
    SIGKILLed, the OS has freed the lock (its data-loader workers, orphaned for a few seconds, hold none) and a
    resume continues the run with no epoch lost or repeated."""
    run, go = tmp_path / "run", str(tmp_path / "go")
    open(go, "w").close()
    proc = start_cli(go, "train", "--features", cache, "--run-dir", str(run), "--epochs", "400", *FLAGS,
                     "--num-workers", "2")
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not (run / "metrics.jsonl").is_file() or not epochs_of(run):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {proc.pid} on host {socket.gethostname()}" in err, err
        assert proc.poll() is None                                # the holder trained on, undisturbed
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        stop(proc)
    assert main(["train", "--resume", str(run), "--stop-after", "1", "--num-workers", "0", "--no-progress"]) == 0
    done = safe_load(str(run / "last.pt"))["epoch"]
    assert done >= 2 and epochs_of(run) == list(range(1, done + 1))


HOLD_AND_FORK = """import os, sys, time
from c2f.app.runs import lock_run
lock = lock_run(sys.argv[1])
child = os.fork()                       # as a data-loader worker is forked
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)"""


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    """Orphaned data-loader workers outlive a SIGKILLed run by seconds; the lock must not live on in them."""
    from c2f.app.runs import lock_run
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(LockedError, match=f"pid {holder.pid} on host"):
            lock_run(str(tmp_path))
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        os.kill(child, 0)                                        # the child still runs ...
        lock_run(str(tmp_path)).release()                       # ... and holds no lock
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        stop(holder)


# ---------------------------------------------------------------------------- verified resume state

@pytest.fixture(scope="module")
def stopped_run(cache, tmp_path_factory):
    """A run of 2 epochs stopped after the first (copy it before changing it)."""
    run = str(tmp_path_factory.mktemp("stopped") / "run")
    train(config(cache, run, epochs=2, stop_after=1))
    return run


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def contents(run):
    return {name: (run / name).read_bytes() for name in os.listdir(run) if name != ".c2f-lock"}


@pytest.mark.parametrize("start, count", [(None, 16), (0, 1), (-1, 1)])
def test_a_changed_byte_in_last_pt_is_refused_on_resume(stopped_run, tmp_path, capsys, start, count):
    """16 bytes flipped in the middle (the issue's case: it loaded silently, Adam's state at ~1e5), or a
    single byte at either end: resume refuses the file in one line and changes nothing."""
    run = copy_of(stopped_run, tmp_path)
    last = run / "last.pt"
    flip_bytes(str(last), last.stat().st_size // 2 if start is None else start, count)
    before = contents(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "last.pt: fails its checksum" in err, err
    assert contents(run) == before


@pytest.mark.parametrize("edit", [dict(num_heads=2), dict(lr=0.1), dict(num_heads=2, lr=0.1)])
def test_an_edited_config_json_is_refused_on_resume(stopped_run, tmp_path, capsys, edit):
    """config.json must be the config last.pt was trained with: the issue's head count took effect mid-run,
    its lr was ignored yet written back to last.pt. Each edited field is named."""
    run = copy_of(stopped_run, tmp_path)
    edit_json(str(run / "config.json"), **edit)
    before = contents(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from the config stored in its last.pt" in err, err
    saved = safe_load(str(run / "last.pt"))["config"]
    for name, value in edit.items():
        assert f"{name} {value!r} (last.pt has {saved[name]!r})" in err, err
    assert contents(run) == before


def test_operational_settings_in_config_json_may_change(stopped_run, tmp_path):
    run = copy_of(stopped_run, tmp_path)
    edit_json(str(run / "config.json"), log_every=7, num_workers=0)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert epochs_of(run) == [1, 2] and json.load(open(run / "config.json"))["log_every"] == 7


def test_a_run_stopped_before_its_first_epoch_resumes(cache, tmp_path, monkeypatch):
    """Stopped in epoch 1 (config.json, no epoch, no last.pt): it could be neither resumed nor rerun; now a
    resume starts it again from epoch 1, exactly as a run that was never stopped."""
    straight = tmp_path / "straight"
    train(config(cache, straight, epochs=2))
    run = tmp_path / "run"

    def killed(self):
        raise KeyboardInterrupt("killed during epoch 1")

    monkeypatch.setattr(Trainer, "train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config(cache, run, epochs=2))
    monkeypatch.undo()
    assert (run / "config.json").is_file() and not (run / "last.pt").exists() and epochs_of(run) == []
    with pytest.raises(RunError, match="already holds a run"):
        train(config(cache, run, epochs=2))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    timing = ("data_wait_s", "compute_s", "wait_frac", "epoch_s")

    def strip(d):
        return [{k: v for k, v in json.loads(ln).items() if k not in timing} for ln in open(d / "metrics.jsonl")]
    assert strip(run) == strip(straight)


def test_a_run_killed_between_its_checkpoint_and_log_line_resumes(cache, tmp_path, monkeypatch):
    """last.pt is written before the epoch's metrics line, and carries it: a SIGKILL in between leaves a run
    whose resume restores the line and goes on from epoch 2, as a run never stopped (no epoch lost or repeated)."""
    straight = tmp_path / "straight"
    train(config(cache, straight, epochs=3))
    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the metrics line was written")

    monkeypatch.setattr(runs.MetricsLog, "append", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config(cache, run, epochs=3))
    monkeypatch.undo()
    assert safe_load(str(run / "last.pt"))["epoch"] == 1 and epochs_of(run) == []
    assert main(["train", "--resume", str(run), "--stop-after", "1", "--no-progress"]) == 0
    assert safe_load(str(run / "last.pt"))["epoch"] == 2 and epochs_of(run) == [1, 2]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    timing = ("data_wait_s", "compute_s", "wait_frac", "epoch_s")

    def strip(d):
        return [{k: v for k, v in json.loads(ln).items() if k not in timing} for ln in open(d / "metrics.jsonl")]
    assert strip(run) == strip(straight)

    first = tmp_path / "first"                      # killed between epoch 1's best.pt and its last.pt

    def killed_after_best(self, record=None):
        raise KeyboardInterrupt("killed before last.pt was written")

    monkeypatch.setattr(Trainer, "_checkpoint", killed_after_best)
    with pytest.raises(KeyboardInterrupt):
        train(config(cache, first, epochs=3))
    monkeypatch.undo()
    assert (first / "best.pt").is_file() and not (first / "last.pt").exists() and epochs_of(first) == []
    assert main(["train", "--resume", str(first), "--no-progress"]) == 0
    assert strip(first) == strip(straight)


def test_a_logged_first_epoch_without_last_pt_resumes_from_epoch_1(cache, tmp_path):
    """c2f 0.2.0 and earlier appended epoch 1's line before writing last.pt: a run killed in between starts
    again from epoch 1; with two epochs logged and no last.pt the resume is refused (the checkpoint was lost)."""
    straight = tmp_path / "straight"
    train(config(cache, straight, epochs=2))
    run = tmp_path / "run"
    train(config(cache, run, epochs=2, stop_after=1))
    for name in ("last.pt", "best.pt", "best.safetensors"):   # as 0.2.0 left it: line, then last.pt, then best
        (run / name).unlink(missing_ok=True)
    assert epochs_of(run) == [1]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    timing = ("data_wait_s", "compute_s", "wait_frac", "epoch_s")

    def strip(d):
        return [{k: v for k, v in json.loads(ln).items() if k not in timing} for ln in open(d / "metrics.jsonl")]
    assert strip(run) == strip(straight)
    (run / "last.pt").unlink()                       # removed after two epochs: still refused
    with pytest.raises(RunError, match="2 epoch"):
        train(resume_config(run, {}), resume=True)


def test_best_checkpoint_selection_never_compares_nan(stopped_run, tmp_path):
    """A last.pt of an earlier c2f holding a NaN best score froze best.pt at epoch 1; the next finite score
    now replaces it."""
    run = copy_of(stopped_run, tmp_path)
    state = safe_load(str(run / "last.pt"))
    state["best"] = [math.nan, math.nan]
    torch.save(state, run / "last.pt")                          # as an earlier c2f wrote it: no checksum
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert json.load(open(run / "final.json"))["best_epoch"] == 2
    assert safe_load(str(run / "best.pt"))["epoch"] == 2


# ------------------------------------------------------------------------ non-finite outside batches

@pytest.fixture(scope="module", params=["val", "test"])
def split_nan_cache(request, cache, tmp_path_factory):
    """The small cache with one row of the run's ``val`` (or the cache's ``test``) split set to NaN, its
    shard's sha256 updated; returns (directory, split, row)."""
    fc = FeatureCache(cache)
    _, val, test = split_rows(fc.labels, fc.is_train, 0.25, 0)
    row = int((val if request.param == "val" else test)[1])
    out = nan_rows(cache, str(tmp_path_factory.mktemp(f"{request.param}-nan") / "cache"), [row])
    return out, request.param, row


def test_nan_in_a_validation_or_test_row_stops_the_run_naming_the_rows(split_nan_cache, tmp_path, capsys):
    cache, split, row = split_nan_cache
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--features", cache, "--run-dir", str(run), "--epochs", "2", "--quiet", *FLAGS]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"on the {split} split: logits at cache rows [{row}] (its ce, top1, top5, " \
                             "mean_class_acc would be non-finite)" in err[0], err
    assert "1 of " in err[0] and "--skip-nonfinite" in err[0]
    assert not (run / "final.json").exists()
    assert (run / "last.pt").exists() == (split == "test")   # validation fails in epoch 1, test at the end
    # With --skip-nonfinite the row is left out and counted; the selection compares finite scores only.
    skipped = tmp_path / "skipped"
    assert main(["train", "--features", cache, "--run-dir", str(skipped), "--epochs", "2", "--skip-nonfinite",
                 *FLAGS]) == 0
    recs = [json.loads(ln) for ln in open(skipped / "metrics.jsonl")]
    final = json.load(open(skipped / "final.json"))
    if split == "val":
        assert [r["val_nonfinite_rows"] for r in recs] == [1, 1] and all(np.isfinite(r["val_ce"]) for r in recs)
    else:
        assert final["test"]["nonfinite_rows"] == 1 and np.isfinite(final["test"]["ce"])
    assert final["best_epoch"] in (1, 2)
