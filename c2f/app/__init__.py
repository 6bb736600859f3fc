"""Training the C2F head on a feature cache: stages, mixup, metrics, checkpoints, resume, DDP.

``train(TrainConfig(...))`` runs one stage and returns the held-out test metrics of the best epoch;
``train(resume_config(run_dir), resume=True)`` continues a run. The pieces live in ``c2f.app.config``
(settings), ``c2f.app.trainer`` and ``c2f.app.epoch`` (the loop), ``c2f.app.runs`` (run directories),
``c2f.model_file`` (files) and ``c2f.app.metrics``; this module gathers the public names.
"""
from __future__ import annotations

from ..errors import ConfigError, NonFiniteError
from ..model_file import CheckpointError, atomic_save
from .checkpoint import rng_state, set_rng_state
from .config import HEADS, STAGES, TrainConfig
from .data import split_rows
from .epoch import cosine_lambda
from .metrics import average_precision, classification_metrics, format_epoch, format_final
from .runs import ResumeConflict, RunError, load_run_config, resume_config
from .sources import DEMO_CACHE, DEMO_SYNTH
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "train", "resume_config", "load_run_config", "STAGES", "HEADS",
           "DEMO_CACHE", "DEMO_SYNTH", "ConfigError", "CheckpointError", "NonFiniteError", "ResumeConflict",
           "RunError", "average_precision", "classification_metrics", "split_rows", "cosine_lambda",
           "atomic_save", "rng_state", "set_rng_state", "format_epoch", "format_final"]


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Runs ``cfg`` (or, with ``resume``, continues the run in ``cfg.run_dir``) and returns the final result.

    The result: ``best_epoch``, ``test`` metrics, ``num_classes``, ``chance`` and ``run_dir``; an empty
    dict when ``stop_after`` ended the invocation early.
    """
    trainer = Trainer(cfg, resume=resume)
    try:
        result = trainer.fit()
    except BaseException:
        trainer.close(barrier=False)   # no barrier: a peer that did not fail may be in another collective
        raise
    trainer.close()
    return result
