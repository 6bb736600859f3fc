"""Runs a researcher can trust: resume keyed on the run directory given, no overwrite, no silent NaN,
mixed precision, compile, and no host read-back per step."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from c2f import devices
from c2f.checkpoint import safe_load
from c2f.cli import main
from c2f.data import FeatureCache, split_rows, synthesize
from c2f.train import NonFiniteError, ResumeConflict, RunError, TrainConfig, Trainer, resume_config, train

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
    LOOP = (os.path.join("c2f", "epoch.py"), os.path.join("c2f", "trainer.py"))
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
