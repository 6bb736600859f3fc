"""The training loop: one stage of the C2F head on a feature cache, resumable, with DDP under torchrun.

``Trainer(cfg, resume)`` checks everything before it writes anything: the settings, the run directory
(never an existing run unless resuming it; its lock taken before the first write, or before a resume
reads it), the cache (on resume: the very cache the run trained on, by its manifest) and the checkpoint
(its checksum, and ``config.json`` against the config stored in it). The step reads the losses back to
the host once per ``log_every`` steps; a non-finite loss or gradient stops the run with the epoch, step and cache rows
of the batch before anything non-finite is checkpointed (or, with ``skip_nonfinite``, skips the batch).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import time

import numpy as np
import torch

from .. import model_file, reference
from ..errors import ConfigError
from ..extras import available, install_hint, require
from ..files import LockedError, atomic_write
from ..part_mixup import PartMixup
from . import checkpoint, evaluate, metrics, plots, runs
from .config import TrainConfig, resume_conflicts
from .data import attribute_targets, split_rows
from .devices import resolve_amp
from .distributed import Dist
from .epoch import EpochLoop, cosine_lambda
from .sources import DataSources

log = logging.getLogger(__name__)


class Trainer(EpochLoop, DataSources):
    """One training stage: ``Trainer(cfg)`` sets up (in named steps, checking before writing), ``fit()``
    trains and tests, ``close()`` releases the process group and writers. ``resume=True`` continues the
    run in ``cfg.run_dir`` from its ``last.pt``."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        cfg.validate()
        self.cfg, self.resuming = cfg, resume
        self.dist = Dist(cfg.device)
        self.device = self.dist.device
        self.amp = resolve_amp(cfg.amp, self.device)
        self.plots = cfg.plots and self._plots_available()
        if cfg.tensorboard:
            require("torch.utils.tensorboard", "tensorboard", "--tensorboard", "tensorboard")
        if self.dist.main:
            for warning in cfg.warnings():
                log.warning(warning)
        try:
            self._check_run_dir()
            self._setup_data()
            self._setup_model()
            self._setup_optimiser()
            self._setup_run_dir()
        except BaseException:
            # A failed set-up (a resume conflict, say) still tears the process group down safely; no barrier,
            # since a peer that did not fail may be waiting in another collective.
            self.close(barrier=False)
            raise

    # ------------------------------------------------------------------------------------- setup
    def _plots_available(self) -> bool:
        if available("matplotlib"):
            return True
        if self.dist.main:
            log.warning("plots skipped: matplotlib is not installed (%s adds them)", install_hint("plots"))
        return False

    def _check_run_dir(self) -> None:
        """Picks the run directory and checks it. A new run creates nothing yet; a resumed run takes the
        directory's lock first, then reads its config.json and last.pt and checks that they agree."""
        self.lock, self.resume_state = None, None
        if self.resuming:
            if not self.cfg.run_dir:
                raise ConfigError("run_dir", "resuming needs the run directory")
            self.run_dir = self.cfg.run_dir
            runs.check_resumable(self.run_dir)   # before the lock: no lock file is left in what is not a run
            self._lock()
            runs.check_resumable(self.run_dir)   # again, now that no other process writes the run
            saved, self.saved_run = runs.read_saved(self.run_dir)
            conflicts = resume_conflicts(saved, self.cfg.to_dict())
            if conflicts:
                raise runs.ResumeConflict(self.run_dir, conflicts)
            self.resume_state = runs.read_last(self.run_dir, saved, self.saved_run)
            if self.resume_state is None and self.dist.main:
                log.info("%s stopped before its first epoch ended (no last.pt): starting it again from epoch 1",
                         self.run_dir)
        else:
            self.run_dir = self.dist.broadcast(self.cfg.run_dir or runs.default_run_dir(self.cfg.stage))
            runs.check_new(self.run_dir)
            self.saved_run = {}
        self.dist.barrier()

    def _lock(self, check=None) -> None:
        """Process 0 takes the run directory's lock for the run's life and runs ``check(run_dir)`` under it;
        every process fails if either fails. Only process 0 checks: it writes the run right after, so a
        peer checking later would see those files (a new run's config.json) and refuse its own run."""
        failure = None
        if self.dist.main:
            try:
                self.lock = runs.lock_run(self.run_dir)
                if check is not None:
                    check(self.run_dir)
            except (LockedError, runs.RunError, OSError) as e:
                failure = e
        refused = self.dist.broadcast(None if failure is None else (type(failure).__name__, str(failure)))
        if failure is not None:
            raise failure
        if refused:
            raise (runs.RunError if refused[0] == "RunError" else LockedError)(refused[1])

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.images = self._open_images() if cfg.cub is not None else None
        self.cache = self.images if self.images is not None else self._open_cache()
        if self.images is None and cfg.cached_stats and cfg.head == "fused" and not self.cache.has_stats \
                and self.dist.main:
            log.info("%s holds no token statistics (a cache written before c2f 0.2, or refused): the head computes "
                     "them each step; `c2f cache-stats %s` adds them once", self.features, self.features)
        trained_on = self.saved_run.get("cache_identity")
        if trained_on and trained_on != self.cache.identity:
            if self.images is not None:
                raise ConfigError("backbone", f"{cfg.backbone} on {cfg.cub} is not what {self.run_dir} trained on "
                                              "(a backbone, weights or image list hash differs from the recorded one)")
            raise ConfigError("features", f"{self.features} is not the cache {self.run_dir} trained on (its manifest "
                                          f"differs from the one recorded at {self.saved_run.get('features')})")
        c, h, w = self.cache.feature_shape
        self.dim, self.grid = c, (h, w)
        self.num_parts, self.num_classes = len(self.cache.attribute_names), len(self.cache.class_names)
        self.targets = attribute_targets(cfg.attr_target, self.cache.attributes, self.cache.certainty,
                                         self.cache.labels, self.cache.class_attributes)
        self.train_rows, self.val_rows, self.test_rows = split_rows(
            self.cache.labels, self.cache.is_train, cfg.val_fraction, cfg.seed)
        if len(self.train_rows) < cfg.batch_size:
            raise ConfigError("batch_size", f"{cfg.batch_size} exceeds the {len(self.train_rows)} training images")
        self.train_loader = self._loader(self.train_rows, train=True)
        self.eval_loaders = {name: self._loader(rows, train=False)
                             for name, rows in (("val", self.val_rows), ("test", self.test_rows)) if len(rows)}

    def _setup_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        args = dict(dim=self.dim, num_parts=self.num_parts, num_classes=self.num_classes, num_heads=cfg.num_heads,
                    head_reduce=cfg.head_reduce)
        if cfg.head == "fused":
            from .. import nn as c2f_nn
            self.head = c2f_nn.C2FHead(**args, backend=cfg.backend)
        else:
            self.head = reference.C2FHead(**args)
        if cfg.init:
            state = model_file.read_model_file(cfg.init)
            model_file.load_state(self.head, state["model"], cfg.init)
        self.head.to(self.device)
        self._set_trainable()
        self.model = self.head
        if self.dist.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.head, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model, backend=cfg.compile_backend)
        self.mixup = PartMixup(cfg.mixup_alpha, cfg.mixup_mode, cfg.mixup_views, cfg.mixup_pairing,
                               self.num_classes, cfg.label_smoothing)

    def _set_trainable(self) -> None:
        stage = self.cfg.stage
        train = dict(attention=stage != "fine" or not self.cfg.freeze_attention,
                     regressor=stage != "fine", classifier=stage != "attention")
        for name, flag in train.items():
            for p in getattr(self.head, name).parameters():
                p.requires_grad_(flag)

    def _setup_optimiser(self) -> None:
        cfg = self.cfg
        self.params = [p for p in self.head.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = len(self.train_loader)
        self.lr_lambda = cosine_lambda(cfg.epochs * steps, max(1, int(cfg.warmup_epochs * steps)), cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None
        self.epoch, self.best, self.best_epoch = 0, None, None

    def _setup_run_dir(self) -> None:
        main = self.dist.main
        last_record = None
        if self.resume_state is not None:
            self._load(self.resume_state, os.path.join(self.run_dir, "last.pt"))
            line = self.resume_state.get("record")
            last_record = json.loads(line) if line else None
            self.resume_state = None
        if not self.resuming:
            self._lock(runs.check_new)   # again, under the lock: a run started meanwhile is never joined
        if main:
            if self.images is not None:
                extra = dict(images=self.images.directory, backbone=self.images.backbone_identity)
            else:
                extra = dict(features=self.features)
            runs.write_config(self.run_dir, dataclasses.replace(self.cfg, **self._paths()),
                              cache_identity=self.cache.identity, **extra)
        self.log = runs.MetricsLog(self.run_dir, tensorboard=self.cfg.tensorboard and main)
        if main:
            if self.epoch:
                self.log.truncate(self.epoch, last_record)
            else:
                self.log.start()
        self.dist.barrier()

    # ------------------------------------------------------------------------------- checkpoints
    def _checkpoint(self, record: dict | None = None) -> dict:
        # The epoch's metrics line as JSON text: what metrics.jsonl holds, and plain data for a safe load.
        return dict(record=None if record is None else json.dumps(record),
                    model=self.head.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), epoch=self.epoch, best=self.best,
                    best_epoch=self.best_epoch, rng=checkpoint.rng_state(), config=self.cfg.to_dict(),
                    cache_identity=self.cache.identity,
                    scaler=None if self.scaler is None else self.scaler.state_dict())

    def _load(self, state: dict, path: str) -> None:
        model_file.load_state(self.head, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule is rebuilt from this run's epochs: an extended run decays over its new total.
        lrs = [base * self.lr_lambda(self.scheduler.last_epoch) for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]
        if self.best is not None and not all(map(math.isfinite, self.best)):
            log.warning("%s: the best score recorded in last.pt is not finite (%s): the next epoch's "
                        "validation score replaces it", path, self.best)
            self.best = None
        checkpoint.set_rng_state(state["rng"])
        if self.epoch > self.cfg.epochs:
            raise ConfigError("epochs", f"{self.run_dir} has trained {self.epoch} epochs already; "
                                        f"--epochs {self.cfg.epochs} would shorten it")
        if self.dist.main:
            moved = self.saved_run.get("run_dir")
            if moved and os.path.abspath(self.run_dir) != moved:
                log.info("the run was made in %s; continuing it in %s", moved, os.path.abspath(self.run_dir))
            log.info("resuming %s after epoch %d of %d", self.run_dir, self.epoch, self.cfg.epochs)

    def _save_best(self, val) -> None:
        model_file.save_model(os.path.join(self.run_dir, "best.pt"), self.head, epoch=self.epoch, metrics=val,
                              config=dict(self.cfg.to_dict(), **self._paths()),
                              class_names=list(self.cache.class_names),
                              attribute_names=list(self.cache.attribute_names), grid=list(self.grid))

    def evaluate(self, split: str, keep_attention: int = 0) -> dict:
        """Metrics on ``split`` ("val" or "test") over all processes; ``keep_attention`` maps kept."""
        local = evaluate.collect(self.head, self.eval_loaders[split], self.device, self.amp, keep_attention,
                                 self.cfg.cached_stats)
        outputs = evaluate.concat(self.dist.gather(local))
        m, outputs = evaluate.split_metrics(outputs, split, self.num_classes, self.cfg.attr_loss,
                                            self.cfg.skip_nonfinite)
        if keep_attention:
            m["_attention"] = outputs["attn"]
            m["_rows"] = outputs["rows"][:keep_attention]
        return m

    # ----------------------------------------------------------------------------------- the loop
    def _score(self, val: dict | None) -> tuple | None:
        """Higher is better; ties on top-1 go to the lower validation cross-entropy. None without a finite
        score (no validation rows left), so that selection never compares NaN."""
        keys = ("reg",) if self.cfg.stage == "attention" else ("top1", "ce")
        if not val or not all(isinstance(val.get(k), float) and math.isfinite(val[k]) for k in keys):
            return None
        return (-val["reg"],) if self.cfg.stage == "attention" else (val["top1"], -val["ce"])

    def _improves(self, val: dict | None, score: tuple | None) -> bool:
        """Whether this epoch's model becomes best.pt: without validation, every epoch; otherwise the first
        epoch, then an epoch whose finite score beats the best one (an unscored epoch never does)."""
        if val is None or self.best_epoch is None:
            return True
        return score is not None and (self.best is None or score > tuple(self.best))

    def fit(self) -> dict:
        """Trains to ``cfg.epochs`` (or ``stop_after`` more epochs: then returns {}) and runs ``finish``."""
        cfg, ran = self.cfg, 0
        if self.epoch >= cfg.epochs and self.dist.main:
            log.info("%s has trained all %d epochs; pass a larger --epochs to extend it", self.run_dir, cfg.epochs)
        while self.epoch < cfg.epochs:
            if cfg.stop_after is not None and ran >= cfg.stop_after:
                if self.dist.main:
                    log.info("stopped after epoch %d of %d (--stop-after %d); continue with: c2f train --resume %s",
                             self.epoch, cfg.epochs, cfg.stop_after, self.run_dir)
                return {}
            start = time.perf_counter()
            record = self.train_epoch()
            self.epoch += 1
            ran += 1
            val = self.evaluate("val") if "val" in self.eval_loaders else None
            record = dict(epoch=self.epoch, **record, epoch_s=time.perf_counter() - start)
            if val is not None:
                record.update({f"val_{k}": v for k, v in val.items()})
            score = self._score(val)
            improved = self._improves(val, score)
            if improved:
                self.best, self.best_epoch = score, self.epoch
            if self.dist.main:
                # best.pt, last.pt, then the metrics line: a kill between any two leaves a run whose resume
                # neither loses nor repeats an epoch that metrics.jsonl shows (last.pt carries the line).
                if improved:
                    self._save_best(val)
                model_file.atomic_save(self._checkpoint(record), os.path.join(self.run_dir, "last.pt"))
                self.log.append(record)
                log.info(metrics.format_epoch(record, cfg.epochs))
            self.dist.barrier()
        return self.finish()

    def finish(self) -> dict:
        """Tests the best epoch's model; writes ``final.json``, plots and attention maps; returns the result."""
        self.dist.barrier()   # best.pt is written by process 0; torchrun's processes share one file system
        best = os.path.join(self.run_dir, "best.pt")
        model_file.load_state(self.head, model_file.read_model_file(best)["model"], best)
        keep = self.cfg.save_attention
        test = self.evaluate("test", keep_attention=keep) if "test" in self.eval_loaders else {}
        val = self.evaluate("val", keep_attention=4) if "val" in self.eval_loaders else {}
        result = dict(best_epoch=self.best_epoch, test={k: v for k, v in test.items() if not k.startswith("_")},
                      num_classes=self.num_classes, chance=1.0 / self.num_classes,
                      run_dir=os.path.abspath(self.run_dir))
        if self.dist.main:
            metrics.write_records(os.path.join(self.run_dir, "final.json"), result)
            if keep and test.get("_attention") is not None:
                self._write_attention(test["_attention"], test["_rows"])
            if self.plots:
                plots.learning_curves(self.log.records(), os.path.join(self.run_dir, "curves.png"))
                if val.get("_attention") is not None:
                    plots.attention_maps(val["_attention"], self.grid, self.cache.attribute_names,
                                         self.cache.labels[val["_rows"]], self.cache.class_names,
                                         os.path.join(self.run_dir, "attention.png"))
        return result

    def _write_attention(self, attn: np.ndarray, rows: np.ndarray) -> None:
        maps = attn.reshape(len(attn), attn.shape[1], *self.grid).astype(np.float32)
        for name, array in (("attention.npy", maps), ("attention_rows.npy", rows.astype(np.int64))):
            atomic_write(os.path.join(self.run_dir, name), lambda f, a=array: np.save(f, a))

    def close(self, barrier: bool = True) -> None:
        """Closes the writers and the process group; ``barrier=False`` on an error path (see ``Dist.close``)."""
        if getattr(self, "log", None) is not None:
            self.log.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None
        self._release_ddp()
        self.dist.close(barrier)

    def _release_ddp(self) -> None:
        """Drops DDP's reducer before the process group is destroyed.

        The reducer holds a reference to the group. Were it the last one, the group (and gloo's worker
        threads) would be torn down in the reducer's destructor with the GIL held, while a worker thread may
        still need the GIL to free a finished collective's tensors: a deadlock (2 of 24 two-process runs hung
        so; gdb showed ``~Reducer -> ~ProcessGroupGloo -> join`` against ``~AsyncAllgatherWork -> decref``).
        Without the reducer, ``destroy_process_group`` drops the last reference from Python, in a destructor
        that releases the GIL. The reducer and DDP's logger (which holds it too) are taken off the wrapper
        itself, so a wrapper still referenced elsewhere (an exception's traceback, say) no longer matters.
        """
        model = getattr(self, "model", None)
        ddp = getattr(model, "_orig_mod", model)   # under torch.compile: the DDP it wraps
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            return
        for name in ("logger", "reducer"):
            ddp.__dict__.pop(name, None)
        self.model = None
        gc.collect()   # a reference cycle still holding the reducer goes now, while the group is alive
