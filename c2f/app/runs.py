"""Run directories: creation (never over an existing run), the saved config, resume checks, the metric
logs (``metrics.jsonl``, ``metrics.csv``, optional TensorBoard) and the listing behind ``c2f runs``.

A run directory holds ``config.json`` (every saved ``TrainConfig`` field, paths absolute, and a
``_run`` section: the run directory and feature cache it was made with), ``metrics.jsonl`` and
``metrics.csv`` (one row per epoch), ``last.pt`` (resume state), ``best.pt`` (a model file, see
``c2f.model_file``), ``final.json``, plots, and ``.c2f-lock``: the lock one training holds for its life
(``lock_run``; not a run file: a directory holding only it holds no run). Resume reads ``last.pt``
through its checksum and refuses a ``config.json`` that differs from the config stored in it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

from .. import model_file
from ..files import DirLock, atomic_write_text, lock_directory
from .config import ConfigError, TrainConfig, apply, from_dict, read_config_file, resume_conflicts
from .metrics import csv_text, format_table

log = logging.getLogger(__name__)

CONFIG = "config.json"
RUN_MARKERS = (CONFIG, "last.pt", "best.pt", "metrics.jsonl")


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (exists already, or holds nothing to resume)."""


class EditedConfig(RunError):
    """A run whose ``config.json`` differs from the config its ``last.pt`` was trained with:
    ``conflicts`` are ``(name, config.json value, last.pt value)``."""

    def __init__(self, run_dir: str, conflicts: list):
        self.run_dir, self.conflicts = run_dir, conflicts
        listed = ", ".join(f"{k} {v!r} (last.pt has {s!r})" for k, v, s in conflicts)
        super().__init__(f"cannot resume {run_dir}: its {CONFIG} differs from the config stored in its last.pt: "
                         f"{listed}; {CONFIG} was edited: restore those values (a resumed run keeps its "
                         "settings; rerun them in a new directory with --config)")


class ResumeConflict(ConfigError):
    """Settings given with ``--resume`` that differ from the run's saved config: ``(name, given, saved)``."""

    def __init__(self, run_dir: str, conflicts: list):
        self.run_dir, self.conflicts = run_dir, conflicts
        listed = ", ".join(f"{k}={v!r} (the run has {s!r})" for k, v, s in conflicts)
        super().__init__("resume", f"cannot resume {run_dir} with settings that differ from its saved config: "
                                   f"{listed}; leave them out, or start a new run")


def default_run_dir(stage: str, root: str = "runs") -> str:
    """``runs/<stage>-<time>``, with a suffix if a run of that second exists already."""
    base = os.path.join(root, f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, i = base, 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}"
    return path


def holds_run(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in RUN_MARKERS)


def check_new(run_dir: str) -> None:
    """Refuses a directory that already holds a run (its files are never overwritten)."""
    if holds_run(run_dir):
        raise RunError(f"{run_dir} already holds a run; continue it with --resume, or choose another --run-dir")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunError(f"{run_dir} exists and is not a directory")


def lock_run(run_dir: str) -> DirLock:
    """The run directory's writer lock (``c2f.files.lock_directory``): one training writes a run at a time."""
    return lock_directory(run_dir, "run", "wait for it to end, or choose another --run-dir")


def check_resumable(run_dir: str) -> None:
    """Refuses what cannot be resumed. A run stopped before its first epoch ended (``config.json``, no epoch
    logged, no checkpoint) can: it starts again from epoch 1 with its saved settings."""
    if not os.path.isfile(os.path.join(run_dir, CONFIG)):
        raise RunError(f"{run_dir} is not a c2f run directory (no {CONFIG}); nothing to resume")
    if os.path.isfile(os.path.join(run_dir, "last.pt")):
        return
    logged = MetricsLog(run_dir).records()
    # best.pt, last.pt, then the epoch's line are written in that order: a run killed before its first last.pt
    # has nothing logged (a best.pt maybe) and starts again from epoch 1, like one stopped before it ended.
    # c2f 0.2.0 logged the line first and wrote best.pt last: its run killed in between the first line and the
    # first checkpoint has epoch 1 logged, no best.pt, and starts again from epoch 1 too.
    legacy_first_checkpoint_lost = [r.get("epoch") for r in logged] == [1] and not os.path.isfile(
        os.path.join(run_dir, "best.pt"))
    if logged and not legacy_first_checkpoint_lost:
        raise RunError(f"{run_dir} has {len(logged)} epoch(s) logged but no last.pt to resume from (was it "
                       "removed?); restore it, or start a new run")


def read_last(run_dir: str, saved: TrainConfig, saved_run: dict) -> dict | None:
    """``last.pt`` (checksum verified) once ``config.json`` (``saved`` settings, ``saved_run`` facts) is found to
    be the config it was trained with (else ``EditedConfig``); None for a run stopped before its first epoch."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.isfile(path):
        return None
    state = model_file.safe_load(path)
    edited = stored_config_conflicts(saved, state.get("config") or {})
    identity = state.get("cache_identity")
    if identity is not None and identity != saved_run.get("cache_identity"):
        edited.append(("_run.cache_identity", saved_run.get("cache_identity"), identity))
    if edited:
        raise EditedConfig(run_dir, edited)
    return state


def stored_config_conflicts(saved: TrainConfig, stored: dict) -> list:
    """``(name, config.json value, last.pt value)`` of the settings a resume keeps fixed that differ between
    ``config.json`` (``saved``) and the config stored in ``last.pt`` (``stored``): an edited config.json."""
    fixed = resume_conflicts(saved, {k: v for k, v in stored.items() if hasattr(saved, k)})
    return [(name, on_disk, in_checkpoint) for name, in_checkpoint, on_disk in fixed]


def write_config(run_dir: str, cfg: TrainConfig, **run) -> None:
    """``config.json``: the saved settings plus ``_run`` (absolute run directory and ``run`` facts)."""
    data = dict(cfg.to_dict(saved_only=True), _run=dict(run_dir=os.path.abspath(run_dir), **run))
    atomic_write_text(os.path.join(run_dir, CONFIG), json.dumps(data, indent=1))


def read_saved(run_dir: str) -> tuple:
    """``(TrainConfig, run facts)`` saved in ``run_dir/config.json``; ``run_dir`` is set to the one given."""
    data = read_config_file(os.path.join(run_dir, CONFIG))
    cfg = from_dict(data, source=os.path.join(run_dir, CONFIG))
    cfg.run_dir = run_dir
    return cfg, data.get("_run", {})


def load_run_config(run_dir: str) -> TrainConfig:
    return read_saved(run_dir)[0]


def resume_config(run_dir: str, given: dict | None = None) -> TrainConfig:
    """The saved config of ``run_dir`` with the explicitly ``given`` settings applied.

    Operational settings (workers, progress, stop_after, a moved ``features`` path, ...) may differ;
    ``epochs`` may grow (the run is extended); any other difference raises ``ResumeConflict``.
    """
    check_resumable(run_dir)
    saved, _ = read_saved(run_dir)
    given = {k: v for k, v in (given or {}).items() if k != "run_dir"}
    conflicts = resume_conflicts(saved, given)
    if conflicts:
        raise ResumeConflict(run_dir, conflicts)
    return apply(saved, given)


# ------------------------------------------------------------------------------------ metric logs

class MetricsLog:
    """``metrics.jsonl`` (appended, one line an epoch), ``metrics.csv`` (rewritten from it) and TensorBoard."""

    def __init__(self, run_dir: str, tensorboard: bool = False):
        self.jsonl = os.path.join(run_dir, "metrics.jsonl")
        self.csv = os.path.join(run_dir, "metrics.csv")
        self.writer = None
        if tensorboard:
            from ..extras import require
            tb = require("torch.utils.tensorboard", "tensorboard", "--tensorboard", "tensorboard")
            self.writer = tb.SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def records(self) -> list:
        if not os.path.isfile(self.jsonl):
            return []
        with open(self.jsonl, encoding="utf-8") as f:
            return [json.loads(ln) for ln in f if ln.strip()]

    def start(self) -> None:
        open(self.jsonl, "w").close()
        self._write_csv([])

    def truncate(self, epoch: int, record: dict | None = None) -> None:
        """Drops lines of epochs logged after the checkpoint being resumed was taken; restores that epoch's
        ``record`` (stored in the checkpoint) if a kill came between the checkpoint and its line."""
        kept = [r for r in self.records() if r["epoch"] <= epoch]
        if record is not None and record.get("epoch") == epoch and (not kept or kept[-1]["epoch"] < epoch):
            kept.append(record)
        with open(self.jsonl, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._write_csv(kept)

    def append(self, record: dict) -> None:
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._write_csv(self.records())
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch" and value is not None:
                    self.writer.add_scalar(key.replace("_", "/", 1), value, record["epoch"])
            self.writer.flush()

    def _write_csv(self, records: list) -> None:
        atomic_write_text(self.csv, csv_text(records) if records else "epoch\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------------------------------ c2f runs

RUN_COLUMNS = [("run", "run", None), ("stage", "stage", None), ("head", "head", None),
               ("epochs", "epochs", None), ("status", "status", None), ("best_epoch", "best", None),
               ("val_top1", "val top-1", ".1%"), ("val_attr_map", "val attr-mAP", ".3f"),
               ("test_top1", "test top-1", ".1%"), ("test_attr_map", "test attr-mAP", ".3f")]


def run_summary(run_dir: str) -> dict:
    """One row of ``c2f runs``: settings, progress and the best validation and test metrics."""
    with open(os.path.join(run_dir, CONFIG), encoding="utf-8") as f:
        cfg = json.load(f)
    records = MetricsLog(run_dir).records()
    final = None
    if os.path.isfile(os.path.join(run_dir, "final.json")):
        with open(os.path.join(run_dir, "final.json"), encoding="utf-8") as f:
            final = json.load(f)
    done = records[-1]["epoch"] if records else 0
    key = "val_reg" if cfg.get("stage") == "attention" else "val_top1"
    scored = [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    best = (min if key == "val_reg" else max)(scored, key=lambda r: r[key]) if scored else {}
    test = (final or {}).get("test") or {}
    status = "done" if final and done >= cfg.get("epochs", 0) else "stopped" if records else "empty"
    return dict(run=os.path.basename(os.path.normpath(run_dir)), path=os.path.abspath(run_dir),
                stage=cfg.get("stage"), head=cfg.get("head"), epochs=f"{done}/{cfg.get('epochs')}",
                status=status, best_epoch=best.get("epoch"), val_top1=best.get("val_top1"),
                val_attr_map=best.get("val_attr_map"), test_top1=test.get("top1"),
                test_attr_map=test.get("attr_map"))


def list_runs(root: str) -> list:
    """Summaries of the runs directly under ``root`` (or ``root`` itself if it is a run), by name."""
    if not os.path.isdir(root):
        raise RunError(f"{root} is not a directory")
    if os.path.isfile(os.path.join(root, CONFIG)):
        return [run_summary(root)]
    rows = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, CONFIG)):
            try:
                rows.append(run_summary(path))
            except (OSError, ValueError) as e:
                log.warning("skipping %s: %s", path, e)
    return rows


def runs_table(rows: list) -> str:
    return format_table(rows, RUN_COLUMNS)
