"""The epoch loop of ``Trainer``: the training step, losses read back once per logging interval, and
the guard against non-finite losses and gradients."""
from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm

from .. import losses
from ..errors import NonFiniteError
from ..part_mixup import mix_targets
from . import evaluate
from .devices import autocast

log = logging.getLogger(__name__)


def cosine_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


class _Interval:
    """Step results accumulated on the device and read back once per logging interval."""

    def __init__(self, device: torch.device):
        z = torch.zeros((), dtype=torch.float64, device=device)
        self.reg, self.ce, self.grad_norm = z.clone(), z.clone(), z.clone()
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_kind = torch.zeros((), dtype=torch.int64, device=device)   # 1: loss, 2: gradient
        self.rows, self.steps = {}, 0


class EpochLoop:
    """Training epochs for ``Trainer`` (which sets the attributes used here: ``cfg``, ``model``, ``head``,
    ``params``, ``optimizer``, ``scheduler``, ``scaler``, ``mixup``, ``train_loader``, ``device``, ``amp``,
    ``dist``, ``epoch``, ``num_parts``, ``num_classes``).

    Step results stay on the device and are read back once per ``cfg.log_every`` steps and at the end
    of the epoch; a non-finite loss or gradient raises ``NonFiniteError`` at that read-back, naming the
    first bad step and its cache rows, before the epoch's checkpoint is written. With
    ``cfg.skip_nonfinite`` every step is checked on the host and a bad batch is skipped instead.
    """

    def _loss(self, x, labels, attr_target, generator, x_stats=None):
        cfg = self.cfg
        reg = ce = None
        if cfg.stage == "attention":
            out = self.model(x, x_stats=x_stats)
        else:
            perm, mask = self.mixup.sample(x.shape[0], self.num_parts, self.device, generator)
            out = self.model(x, perm, mask, x_stats=x_stats)
            targets = mix_targets(labels, perm, mask, self.num_classes, smoothing=cfg.label_smoothing)
            ce = losses.soft_cross_entropy(out.logits, targets)
        if cfg.stage != "fine":
            reg = losses.attribute_loss(out.attr_pred, attr_target, kind=cfg.attr_loss)
        if reg is None:
            return ce, reg, ce
        if ce is None:
            return reg, reg, ce
        return cfg.attr_weight * reg + ce, reg, ce

    def _step(self, batch: dict, generator, acc: _Interval) -> None:
        x = evaluate.model_input(batch["x"], self.head, self.device)
        labels = batch["labels"].to(self.device, non_blocking=True)
        attr_target = batch["attr_target"].to(self.device, non_blocking=True)
        x_stats = evaluate.model_stats(batch, self.head, self.device, self.cfg.cached_stats)
        with autocast(self.device, self.amp):
            loss, reg, ce = self._loss(x, labels, attr_target, generator, x_stats)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        loss_ok = torch.isfinite(loss.detach())
        # With a gradient scaler, inf gradients are expected now and then: the scaler skips those steps.
        bad = ~loss_ok if self.scaler is not None else ~(loss_ok & torch.isfinite(grad_norm))
        acc.steps += 1
        acc.rows[acc.steps] = batch["index"]
        if self.cfg.skip_nonfinite and bool(self.dist.any(bad)):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            log.warning("skipped a non-finite batch: epoch %d, step %d, cache rows %s",
                        self.epoch + 1, acc.steps, batch["index"].tolist())
        else:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if not self.cfg.skip_nonfinite:
                first = bad & (acc.bad_step < 0)
                acc.bad_step = torch.where(first, acc.steps, acc.bad_step)
                acc.bad_kind = torch.where(first, torch.where(loss_ok, 2, 1), acc.bad_kind)
            good = ~bad
            if reg is not None:
                acc.reg += torch.where(good, reg.detach().double(), 0.0)
            if ce is not None:
                acc.ce += torch.where(good, ce.detach().double(), 0.0)
            acc.grad_norm += torch.where(good, grad_norm.double(), 0.0)
        self.scheduler.step()

    def _flush(self, acc: _Interval, totals: dict, bar) -> None:
        """Reads the interval's sums back to the host (one sync) and stops on a non-finite step."""
        if not acc.steps:
            return
        reg, ce, gnorm, bad_step, bad_kind = torch.stack(
            [acc.reg, acc.ce, acc.grad_norm, acc.bad_step.double(), acc.bad_kind.double()]).tolist()
        if bad_step >= 0:
            step = totals["steps"] + int(bad_step)
            rows = acc.rows[int(bad_step)].tolist()
            what = "loss" if bad_kind == 1 else "gradient"
            raise NonFiniteError(
                f"non-finite {what} at epoch {self.epoch + 1}, step {step} of {len(self.train_loader)} "
                f"(cache rows {rows}); nothing after epoch {self.epoch} was checkpointed. Check those "
                "rows of the cache, lower --lr, or pass --skip-nonfinite to skip such batches")
        counted = acc.steps - (self.skipped - totals["skipped"])
        for key, value in (("reg", reg), ("ce", ce), ("grad_norm", gnorm)):
            totals[key] += value
        totals["steps"] += acc.steps
        totals["counted"] += counted
        totals["skipped"] = self.skipped
        if counted:
            bar.set_postfix(reg=f"{reg / counted:.4f}", ce=f"{ce / counted:.4f}")
        acc.__init__(self.device)

    def train_epoch(self) -> dict:
        self.model.train()
        self.train_loader.sampler.set_epoch(self.epoch)
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.epoch * 1_009 + self.dist.rank)
        self.skipped = 0
        totals = dict(reg=0.0, ce=0.0, grad_norm=0.0, steps=0, counted=0, skipped=0, wait=0.0, backbone=0.0)
        acc = _Interval(self.device)
        bar = tqdm(total=len(self.train_loader), desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                   unit="step", leave=False, disable=not (self.cfg.progress and self.dist.main))
        start = time.perf_counter()
        backbone_before = getattr(self.train_loader, "backbone_s", 0.0)
        it = iter(self.train_loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            totals["wait"] += time.perf_counter() - t0
            if batch is None:
                break
            self._step(batch, generator, acc)
            bar.update()
            if acc.steps >= self.cfg.log_every:
                self._flush(acc, totals, bar)
        self._flush(acc, totals, bar)
        bar.close()
        elapsed = time.perf_counter() - start
        # From images, the backbone runs inside the loader's iteration: its share of the wait is its own.
        totals["backbone"] = getattr(self.train_loader, "backbone_s", 0.0) - backbone_before
        totals["wait"] -= totals["backbone"]
        keys = ("reg", "ce", "grad_norm", "counted", "skipped", "wait", "backbone", "elapsed")
        summed = dict(zip(keys, self.dist.sum([float(totals[k]) for k in keys[:-1]] + [elapsed]), strict=True))
        counted = max(summed["counted"], 1)
        wait, elapsed = summed["wait"] / self.dist.world, summed["elapsed"] / self.dist.world
        backbone = summed["backbone"] / self.dist.world
        record = dict(train_reg=summed["reg"] / counted if self.cfg.stage != "fine" else None,
                      train_ce=summed["ce"] / counted if self.cfg.stage != "attention" else None,
                      train_grad_norm=summed["grad_norm"] / counted, data_wait_s=wait,
                      compute_s=elapsed - wait - backbone, wait_frac=wait / max(elapsed, 1e-12),
                      lr=self.scheduler.get_last_lr()[0])
        if hasattr(self.train_loader, "backbone_s"):
            record["backbone_s"] = backbone
        if summed["skipped"]:
            record["skipped_batches"] = int(summed["skipped"])
        return record
