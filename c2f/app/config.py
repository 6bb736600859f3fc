"""``TrainConfig``: every setting of a training run, with the help text, choices and checks the CLI
builds its flags from (``c2f train --help`` is generated from this dataclass).

Precedence: the dataclass defaults, then a config file (``--config run.toml|run.json``, e.g. a run's
saved ``config.json``), then the flags given. Field metadata:

- ``help``: the flag's help text; ``choices``: allowed values; ``check``: a name in ``CHECKS``;
- ``operational``: changes how a run is executed, not what it computes, so it may differ when a run
  is resumed (everything else must match the saved config, except ``epochs``, which extends the run);
- ``saved=False``: per invocation, not written to ``config.json``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

from .._backend import BACKENDS
from .._validate import HEAD_REDUCES
from ..errors import ConfigError
from ..part_mixup import MODES, PAIRINGS
from .data.cub import TARGET_KINDS
from .devices import AMP_MODES, resolve_device

STAGES = ("attention", "fine", "joint")
HEADS = ("fused", "reference")
ATTR_LOSSES = ("mse", "bce")
VERIFY_MODES = ("full", "size")
RESUME_EXTENDS = ("epochs",)   # may grow on resume: the LR schedule is rebuilt for the new total


CHECKS = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "nonneg": (lambda v: v >= 0, "must be >= 0"),
    "unit": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "unit_open": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "fraction": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
}


def check_value(name: str, value, check: str | None = None, choices=None) -> None:
    """Raises ``ConfigError`` unless ``value`` passes ``check`` and lies in ``choices`` (None passes); a float
    must be finite whatever its check (``--lr inf`` is refused here, not by the first non-finite loss)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
    if check is not None:
        ok, expected = CHECKS[check]
        if not ok(value):
            raise ConfigError(name, f"{expected}, got {value!r}")


def opt(default, help: str, choices=None, check: str | None = None, operational: bool = False,
        saved: bool = True, metavar: str | None = None):
    meta = dict(help=help, choices=choices, check=check, operational=operational, saved=saved, metavar=metavar)
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    features: str | None = opt(None, "feature cache directory (from c2f extract or c2f synth); default: the "
                                  "demo cache in .cache/c2f-demo, synthesized if absent. On resume it may point "
                                  "to the same cache moved elsewhere (checked against its manifest)",
                                  operational=True, metavar="DIR")
    cub: str | None = opt(None, "train from images instead of a cache: the CUB_200_2011 directory, read through "
                             "the frozen --backbone every step (no cache; with augmentation). Not with --features",
                             operational=True, metavar="DIR")
    backbone: str | None = opt(None, "with --cub: the frozen backbone, as for c2f extract (TorchScript file, "
                                  "package.module:factory, torchvision:resnetNN, timm:NAME); its file hashes are "
                                  "recorded and checked on resume", operational=True, metavar="SPEC")
    weights: str | None = opt(None, "with --cub: the backbone's local state_dict file", operational=True,
                                 metavar="FILE")
    image_size: int = opt(448, "with --cub: the side of the images fed to the backbone", check="positive")
    crop_scale: float = opt(0.25, "with --cub: smallest area fraction of the random resized crop (ratio 3/4..4/3)",
                            check="fraction")
    hflip: float = opt(0.5, "with --cub: probability of a horizontal flip", check="unit")
    eval_crop: float = opt(0.875, "with --cub: evaluation resizes the short side to image_size / eval_crop and "
                           "centre-crops image_size", check="fraction")
    run_dir: str | None = opt(None, "run directory; default runs/<stage>-<time>. An existing run is never "
                                 "overwritten: continue it with --resume", operational=True, saved=False,
                                 metavar="DIR")
    stage: str = opt("joint", "attention: train the attention and attribute regressor; fine: the classifier "
                     "(start from --init); joint: both", choices=STAGES)
    head: str = opt("fused", "fused: c2f.nn.C2FHead (never forms the part features); reference: the plain "
                    "PyTorch c2f.reference.C2FHead", choices=HEADS)
    backend: str = opt("auto", "kernels of the fused modules: Triton on CUDA and torch ops on CPU (auto), or "
                       "forced", choices=BACKENDS)
    init: str | None = opt(None, "start from the model weights of this checkpoint (e.g. an attention run's "
                              "best.pt); loaded with weights_only=True", metavar="CHECKPOINT")
    freeze_attention: bool = opt(False, "fine stage: keep the attention fixed and train the classifier only")
    epochs: int = opt(3, "epochs in all (the demo's; CUB wants tens). With --resume, a larger value extends "
                      "the run and the LR schedule is rebuilt for the new total", check="positive")
    batch_size: int = opt(16, "global batch, split over DDP processes", check="positive")
    lr: float = opt(3e-3, "peak learning rate (AdamW)", check="positive")
    weight_decay: float = opt(0.05, "AdamW weight decay", check="nonneg")
    warmup_epochs: float = opt(0.5, "linear warmup, in epochs, before the cosine decay", check="nonneg")
    min_lr_ratio: float = opt(0.01, "final learning rate as a fraction of --lr", check="unit")
    attr_target: str = opt("binary", "attribute targets: image-level labels, certainty-calibrated soft labels, "
                           "or the class-level continuous vectors", choices=TARGET_KINDS)
    attr_loss: str = opt("mse", "attribute regression loss", choices=ATTR_LOSSES)
    attr_weight: float = opt(5.0, "weight of the regression loss in the joint stage", check="nonneg")
    num_heads: int = opt(1, "attention heads", check="positive")
    head_reduce: str = opt("mean", "the heads' attention maps become one map (returned, saved as attention.npy/png) "
                           "by their mean or their max; one head: either is its map", choices=HEAD_REDUCES)
    mixup_alpha: float = opt(1.0, "Beta(alpha, alpha) of the part-wise mixup", check="positive")
    mixup_mode: str = opt("binary", "binary: each part from the sample with probability lambda; blend: every "
                          "part weighed by lambda; part: a lambda per part", choices=MODES)
    mixup_views: int = opt(1, "mixed views per pair (K)", check="positive")
    mixup_pairing: str = opt("flip", "pairing of samples: b <-> B-1-b, or a random involution", choices=PAIRINGS)
    label_smoothing: float = opt(0.0, "label smoothing of the mixed class targets", check="unit_open")
    val_fraction: float = opt(0.1, "fraction of each class's training images held out for validation",
                              check="unit_open")
    seed: int = opt(0, "seed of the model, the split and the batches", check="nonneg")
    amp: str = opt("auto", "mixed precision of the forward: bf16, fp16 (with a gradient scaler) or off; auto: "
                   "bf16 where the device runs it fast (CUDA with bf16, a CPU with AVX512-BF16/AMX), else off",
                   choices=AMP_MODES)
    skip_nonfinite: bool = opt(False, "skip batches whose loss or gradient is not finite, and validation or test "
                               "rows whose outputs are not finite (counted and logged), instead of stopping; "
                               "checks every step (one host sync a step)", operational=True)
    cached_stats: bool = opt(True, "the fused head reads the tokens' LayerNorm statistics from the feature cache "
                             "(written by extract/synth, or c2f cache-stats DIR) instead of computing them each step",
                             operational=True)
    compile: bool = opt(False, "wrap the head in torch.compile", operational=True)
    compile_backend: str = opt("inductor", "torch.compile backend (aot_eager: no code generation, no C++ "
                               "compiler needed)", operational=True)
    log_every: int = opt(50, "read the losses back to the host every this many steps (and at epoch end)",
                         check="positive", operational=True)
    num_workers: int = opt(2, "data loader worker processes (0: load in the main process)", check="nonneg",
                           operational=True)
    preload: bool = opt(False, "load the whole cache into RAM instead of memory-mapping it", operational=True)
    verify: str = opt("full", "cache check at start: every file's sha256 (full) or sizes only",
                      choices=VERIFY_MODES, operational=True)
    device: str | None = opt(None, "cpu, cuda or cuda:N; default: CUDA where available", operational=True)
    stop_after: int | None = opt(None, "end this invocation after that many epochs (continue with --resume)",
                                    check="positive", operational=True, saved=False)
    progress: bool = opt(True, "progress bars", operational=True)
    plots: bool = opt(True, "write curves.png and attention.png (needs matplotlib: the plots extra)",
                      operational=True)
    tensorboard: bool = opt(False, "also log the epoch metrics to <run>/tensorboard (needs tensorboard)",
                            operational=True)
    save_attention: int = opt(0, "write the attention maps [n, P, H, W] of the first N test images to "
                              "attention.npy (rows in attention_rows.npy); 0: none", check="nonneg",
                              operational=True)
    extra: dict = opt({}, "free-form KEY=VALUE settings recorded in config.json (VALUE read as JSON when it "
                      "parses; repeatable)", operational=True, metavar="KEY=VALUE")

    def validate(self) -> None:
        """Checks every field's type, choices and range; raises ``ConfigError`` naming the first bad one."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, _field_types()[f.name])
            check_value(f.name, value, f.metadata["check"], f.metadata["choices"])
        self._check_source()
        resolve_device(self.device)

    def _check_source(self) -> None:
        """A cache (``features``) or images (``cub`` with ``backbone``), not both."""
        if self.cub is not None and self.features is not None:
            raise ConfigError("cub", "cannot be combined with --features: train from a cache or from images")
        if self.cub is None:
            for name in ("backbone", "weights"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, "applies to training from images only: pass --cub DIR too")
            return
        if not os.path.isdir(self.cub):
            raise ConfigError("cub", f"{self.cub} is not a directory (the CUB_200_2011 directory holding images.txt)")
        if self.backbone is None:
            raise ConfigError("backbone", "is needed with --cub: the frozen backbone the images go through")
        if self.weights is not None and not os.path.isfile(self.weights):
            raise ConfigError("weights", f"{self.weights} is not a file")

    def warnings(self) -> list:
        """Settings that are allowed but probably not meant."""
        out = []
        if self.stage == "fine" and self.freeze_attention and not self.init:
            out.append("--stage fine --freeze-attention without --init trains a classifier on a frozen, "
                       "randomly initialised attention; pass --init with an attention run's best.pt")
        if self.freeze_attention and self.stage != "fine":
            out.append(f"--freeze-attention applies to the fine stage only; ignored with --stage {self.stage}")
        return out

    def to_dict(self, saved_only: bool = False) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not saved_only or f.metadata["saved"]}


def _plain(value):
    return dict(value) if isinstance(value, dict) else value


@functools.cache
def _field_types() -> dict:
    return typing.get_type_hints(TrainConfig)


def base_type(tp) -> type:
    """``Optional[int]`` -> ``int``; plain types unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _check_type(name: str, value, tp) -> None:
    if value is None and base_type(tp) is not tp:
        return
    want = base_type(tp)
    ok = (isinstance(value, bool) if want is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
          isinstance(value, int) and not isinstance(value, bool) if want is int else isinstance(value, want))
    if not ok:
        raise ConfigError(name, f"must be {want.__name__}{' or none' if base_type(tp) is not tp else ''}, "
                                f"got {value!r}")


def coerce(name: str, value: Any):
    """A config-file value as the field's type (ints accepted for floats); raises ``ConfigError``."""
    tp = _field_types()[name]
    _check_type(name, value, tp)
    return float(value) if base_type(tp) is float and value is not None else value


def from_dict(values: dict, source: str = "config", base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (defaults) updated with ``values``; keys may use dashes; keys starting with ``_`` are skipped."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    clean = {k.replace("-", "_"): v for k, v in values.items() if not k.startswith("_")}
    unknown = sorted(set(clean) - names)
    if unknown:
        raise ConfigError(source, f"unknown setting(s) {', '.join(unknown)}")
    cfg = dataclasses.replace(base or TrainConfig())
    for k, v in clean.items():
        setattr(cfg, k, coerce(k, v))
    return cfg


def apply(base: TrainConfig, values: dict) -> TrainConfig:
    """``base`` with ``values`` set; dict settings (``extra``) are merged key by key, not replaced."""
    merged = {k: ({**getattr(base, k), **v} if isinstance(v, dict) else v) for k, v in values.items()}
    return dataclasses.replace(base, **merged)


def read_config_file(path: str) -> dict:
    """Settings from a ``.toml`` or ``.json`` file (a run's ``config.json`` included), as a dict."""
    if not os.path.isfile(path):
        raise ConfigError("config", f"{path} not found")
    try:
        if path.endswith(".toml"):
            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError("config", f"{path} does not parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a table of settings, got {type(data).__name__}")
    return data


def resume_conflicts(saved: TrainConfig, given: dict) -> list:
    """``(name, given value, saved value)`` of the explicitly given settings a resumed run cannot take."""
    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    return [(k, v, getattr(saved, k)) for k, v in given.items()
            if not meta[k]["operational"] and k not in RESUME_EXTENDS and v != getattr(saved, k)]
