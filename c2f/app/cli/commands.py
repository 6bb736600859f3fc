"""The subcommands: their flags and what they run. Results are printed here, to stdout."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ...errors import ConfigError
from ..config import VERIFY_MODES, TrainConfig, apply, from_dict, read_config_file
from ..data.cache import CACHE_DTYPES
from ..data.extract import SPLITS as EXTRACT_SPLITS
from ..data.images import CROP_SCALE, HFLIP
from ..devices import AMP_MODES
from .options import add_dataclass_flags, checked, flag, given

log = logging.getLogger("c2f.app.cli")


def describe_error(error: BaseException) -> str:
    """One line for a user error, naming the flag where the error names a setting."""
    from ..runs import ResumeConflict
    if isinstance(error, ResumeConflict):
        listed = ", ".join(f"{flag(k)} {_show(v)} (the run has {_show(s)})" for k, v, s in error.conflicts)
        return (f"cannot resume {error.run_dir}: {listed} differ from its saved config; leave them out, "
                "or start a new run")
    if isinstance(error, ConfigError) and error.name.isidentifier():
        return f"argument {flag(error.name)}: {' '.join(error.problem.split())}"
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _positive(name):
    return checked(int, name, "positive")


def _nonneg(name):
    return checked(int, name, "nonneg")


def _check_out(out) -> None:
    """Refuses an ``--out`` that cannot be written, before any work is done."""
    if out is None:
        return
    if os.path.isdir(out):
        raise ConfigError("out", f"{out} is a directory; give a file name (.json or .csv) inside it")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ConfigError("out", f"cannot write {out}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError("out", f"cannot write {out}: the directory {folder} is not writable")


def _write_out(out: str, write) -> None:
    """Runs ``write()``; an OSError is reported against ``--out`` (the atomic writer leaves nothing behind)."""
    try:
        write()
    except OSError as e:
        raise ConfigError("out", f"cannot write {out}: {e.strerror or e}") from None


def _add_skip_nonfinite(p) -> None:
    p.add_argument("--skip-nonfinite", action="store_true", help="leave out rows whose outputs are not finite "
                   "(counted as nonfinite_rows) instead of stopping with exit code 1")


def _add_runtime(p, batch_size: int = 64) -> None:
    p.add_argument("--batch-size", type=_positive("batch_size"), default=batch_size, help="images per batch")
    p.add_argument("--device", help="cpu, cuda or cuda:N; default: CUDA where available")
    p.add_argument("--amp", choices=AMP_MODES, default="off", help="mixed precision of the forward")
    p.add_argument("--num-workers", type=_nonneg("num_workers"), default=0, help="data loader worker processes")


# ------------------------------------------------------------------------------------------- train

def _add_train(p) -> None:
    p.add_argument("--config", metavar="FILE", help="read settings from a .toml or .json file (a run's "
                   "config.json reruns that run in a new directory); flags given override it (default: none)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or --run-dir) from its last.pt. Flags that change what it "
                   "computes are refused; --epochs N extends it (the LR schedule is rebuilt for the new total) "
                   "(default: off)")
    add_dataclass_flags(p, TrainConfig)


def _run_train(args) -> int:
    from .. import train
    from ..metrics import format_final
    from ..runs import resume_config
    values = given(args, TrainConfig)
    if args.resume:
        if args.config:
            raise ConfigError("config", "cannot be combined with --resume (the run's own config.json is used)")
        run_dir = args.resume if isinstance(args.resume, str) else values.get("run_dir")
        if isinstance(args.resume, str) and values.get("run_dir") not in (None, args.resume):
            raise ConfigError("run_dir", f"{values['run_dir']} differs from --resume {args.resume}")
        if not run_dir:
            raise ConfigError("resume", "needs the run directory: --resume RUN_DIR or --run-dir RUN_DIR")
        cfg = resume_config(run_dir, values)
        cfg.validate()
        result = train(cfg, resume=True)
    else:
        base = from_dict(read_config_file(args.config), source=args.config) if args.config else TrainConfig()
        cfg = apply(base, values)
        cfg.validate()
        result = train(cfg)
    if result and int(os.environ.get("RANK", "0")) == 0:
        print(format_final(result), flush=True)
    return 0


# -------------------------------------------------------------------------------- eval, predict, runs

def _add_eval(p) -> None:
    from ..evaluate import SPLITS
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run directory (its best.pt) or a model file")
    p.add_argument("--features", metavar="DIR", help="feature cache; default: the cache the run trained on")
    p.add_argument("--split", choices=SPLITS, default="test", help="the cache's test split, the run's "
                   "validation or training rows (its seed and --val-fraction), or every image")
    p.add_argument("--out", metavar="FILE", help="metrics file: JSON, or CSV if FILE ends in .csv; default: "
                   "eval-<split>.json beside the checkpoint")
    p.add_argument("--save-attention", type=_nonneg("save_attention"), default=0, metavar="N",
                   help="also write the attention maps [N, P, H, W] of the first N images to <out>-attention.npy")
    p.add_argument("--verify", choices=VERIFY_MODES, default="size", help="cache check: checksums or sizes")
    _add_skip_nonfinite(p)
    _add_runtime(p)


def _run_eval(args) -> int:
    import numpy as np

    from ...files import atomic_write
    from ..evaluate import evaluate_on_cache, resolve_checkpoint
    from ..metrics import format_metrics, write_records
    _check_out(args.out)
    m, outputs, cache, _ = evaluate_on_cache(
        args.source, args.features, args.split, args.batch_size, args.device, args.amp, args.num_workers,
        keep_attention=args.save_attention, verify=args.verify, skip_nonfinite=args.skip_nonfinite)
    record = dict(source=os.path.abspath(args.source), features=os.path.abspath(cache.directory),
                  split=args.split, **m)
    out = args.out or os.path.join(os.path.dirname(resolve_checkpoint(args.source)), f"eval-{args.split}.json")
    _write_out(out, lambda: write_records(out, record))
    if args.save_attention and outputs["attn"] is not None:
        h, w = cache.feature_shape[1:]
        attn = outputs["attn"]
        for suffix, array in (("-attention.npy", attn.reshape(len(attn), attn.shape[1], h, w)),
                              ("-attention-rows.npy", outputs["rows"][:len(attn)])):
            path = os.path.splitext(out)[0] + suffix
            _write_out(path, lambda p=path, a=array: atomic_write(p, lambda f: np.save(f, a)))
    print(f"{args.split}: {format_metrics(m)}")
    print(f"wrote {out}")
    return 0


def _add_predict(p) -> None:
    from ..evaluate import SPLITS
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run directory (its best.pt) or a model file")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--features", metavar="DIR", help="predict the images of this feature cache (--split)")
    what.add_argument("--images", nargs="+", metavar="IMAGE", help="predict these image files, through the "
                      "backbone into the head")
    p.add_argument("--split", choices=SPLITS, default="test", help="with --features: which images")
    p.add_argument("--backbone", help="with --images: as for c2f extract; default: the backbone recorded in "
                   "the manifest of the cache the run trained on (or the run's own, if it trained from images)")
    p.add_argument("--weights", metavar="FILE", help="with --images: the backbone's local weights; default: "
                   "those recorded in that manifest")
    p.add_argument("--image-size", type=_positive("image_size"), help="with --images: default: the training "
                   "cache's")
    p.add_argument("--top-k", type=_positive("top_k"), default=5, help="classes listed per image")
    p.add_argument("--out", metavar="FILE", help="write the predictions as CSV (FILE.csv) or JSON with the "
                   "metrics; default: print them")
    _add_skip_nonfinite(p)
    _add_runtime(p, batch_size=16)


def _run_predict(args) -> int:
    from ..evaluate import evaluate_on_cache, predict_images, prediction_rows
    from ..metrics import format_metrics, format_table, write_records
    _check_out(args.out)
    if args.images:
        outputs, ckpt = predict_images(args.source, args.images, args.backbone, args.weights, args.image_size,
                                       args.device, args.amp, args.batch_size, args.skip_nonfinite)
        m, names, labels = None, [args.images[i] for i in outputs["rows"]], None
    else:
        m, outputs, cache, ckpt = evaluate_on_cache(args.source, args.features, args.split, args.batch_size,
                                                    args.device, args.amp, args.num_workers,
                                                    skip_nonfinite=args.skip_nonfinite)
        names, labels = None, outputs["labels"]
    cfg = ckpt.get("config") or {}
    rows = prediction_rows(outputs, ckpt.get("class_names") or [str(k) for k in range(outputs["logits"].shape[1])],
                           ckpt.get("attribute_names") or [str(a) for a in range(outputs["attr_pred"].shape[1])],
                           cfg.get("attr_loss", "mse"), args.top_k, names, labels)
    if args.out:
        records = rows if args.out.endswith(".csv") else dict(metrics=m, predictions=rows)
        _write_out(args.out, lambda: write_records(args.out, records))
        print(f"wrote {len(rows)} predictions to {args.out}")
    else:
        columns = [("sample", "sample", None), ("pred_name", "predicted", None), ("prob", "prob", ".3f")]
        if labels is not None:
            columns.append(("label_name", "label", None))
        print(format_table(rows, columns))
    if m is not None:
        print(f"{args.split}: {format_metrics(m)}")
    return 0


def _add_runs(p) -> None:
    from ..runs import RUN_COLUMNS
    p.add_argument("directory", nargs="?", default="runs", help="a directory of runs, or one run")
    p.add_argument("--sort", choices=[k for k, _, _ in RUN_COLUMNS], default="run", help="column to sort by")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_runs(args) -> int:
    from ..runs import list_runs, runs_table
    rows = list_runs(args.directory)
    numeric = args.sort in ("val_top1", "val_attr_map", "test_top1", "test_attr_map")
    rows.sort(key=lambda r: (r.get(args.sort) is None, -(r.get(args.sort) or 0) if numeric else str(r.get(args.sort))))
    print(json.dumps(rows, indent=1) if args.json else runs_table(rows) if rows else f"no runs in {args.directory}")
    return 0


# ------------------------------------------------------------------ extract, synth, cache-stats, info

def _add_extract(p) -> None:
    p.add_argument("cub", help="the CUB_200_2011 directory (holding images.txt)")
    p.add_argument("out", help="cache directory")
    p.add_argument("--backbone", required=True, help="TorchScript file, package.module:factory, "
                   "torchvision:resnet50 (needs torchvision) or timm:<model> (needs timm)")
    p.add_argument("--weights", metavar="FILE", help="local state_dict file for the backbone (never downloaded)")
    p.add_argument("--image-size", type=_positive("image_size"), default=448, help="image side fed to the backbone")
    p.add_argument("--split", choices=EXTRACT_SPLITS, default="all", help="images to extract")
    p.add_argument("--batch-size", type=_positive("batch_size"), default=32, help="images per batch")
    p.add_argument("--dtype", choices=CACHE_DTYPES, default="float16", help="cache dtype")
    p.add_argument("--shard-size", type=_positive("shard_size"), default=256, help="images per shard file")
    p.add_argument("--num-workers", type=_nonneg("num_workers"), default=2, help="image decoding processes")
    p.add_argument("--device", help="cpu, cuda or cuda:N; default: CUDA where available")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help="autocast of the backbone; auto: bf16 on CUDA")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    g = p.add_argument_group("augmented views (the middle way between a cache and training from images)")
    g.add_argument("--views", type=_positive("views"), default=1, help="views per training image: view 0 the "
                   "deterministic one, the others random resized crops and flips; training draws one per image per "
                   "epoch. Test images keep one view")
    g.add_argument("--seed", type=_nonneg("seed"), default=0, help="seed of the augmented views")
    g.add_argument("--crop-scale", type=checked(float, "crop_scale", "fraction"), default=CROP_SCALE,
                   help="smallest area fraction of the random resized crop (aspect ratio 3/4..4/3)")
    g.add_argument("--hflip", type=checked(float, "hflip", "unit"), default=HFLIP,
                   help="probability of a horizontal flip")


def _run_extract(args) -> int:
    from ..data import extract
    out = extract(args.cub, args.out, args.backbone, image_size=args.image_size, split=args.split,
                  batch_size=args.batch_size, dtype=args.dtype, shard_size=args.shard_size,
                  num_workers=args.num_workers, device=args.device, weights=args.weights,
                  overwrite=args.overwrite, progress=args.progress, amp=args.amp, views=args.views,
                  seed=args.seed, crop_scale=args.crop_scale, hflip=args.hflip)
    print(out)
    return 0


def _add_synth(p) -> None:
    p.add_argument("out", help="cache directory")
    for name, default, help_text in (("classes", 200, "classes"), ("images-per-class", 60, "images per class"),
                                     ("attributes", 312, "attributes (parts)"), ("dim", 2048, "feature channels"),
                                     ("grid", 14, "feature map side"),
                                     ("locations", 15, "spatial parts the attributes sit on"),
                                     ("classes-per-genus", 4, "classes sharing one attribute profile"),
                                     ("shard-size", 256, "images per shard file")):
        p.add_argument(f"--{name}", type=_positive(name.replace("-", "_")), default=default, help=help_text)
    p.add_argument("--test-fraction", type=checked(float, "test_fraction", "unit_open"), default=0.5,
                   help="fraction of each class held out as test")
    p.add_argument("--noise", type=checked(float, "noise", "nonneg"), default=1.0,
                   help="standard deviation of the noise on every token")
    p.add_argument("--class-flip", type=checked(float, "class_flip", "unit"), default=0.1,
                   help="fraction of attributes where siblings differ")
    p.add_argument("--seed", type=_nonneg("seed"), default=0, help="seed of everything synthesized")
    p.add_argument("--dtype", choices=CACHE_DTYPES, default="float16", help="cache dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def _run_synth(args) -> int:
    from ..data import synthesize
    out = synthesize(args.out, num_classes=args.classes, images_per_class=args.images_per_class,
                     num_attributes=args.attributes, dim=args.dim, grid=args.grid, num_locations=args.locations,
                     test_fraction=args.test_fraction, noise=args.noise, seed=args.seed,
                     classes_per_genus=args.classes_per_genus, class_flip=args.class_flip, dtype=args.dtype,
                     shard_size=args.shard_size, overwrite=args.overwrite, progress=args.progress)
    print(out)
    return 0


def _add_cache_stats(p) -> None:
    p.add_argument("cache", help="feature cache directory (finished)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")


def _run_cache_stats(args) -> int:
    from ..data import add_stats
    done = add_stats(args.cache, progress=args.progress)
    share = done["stats_bytes"] / max(done["feature_bytes"], 1)
    print(f"{args.cache}: statistics of {done['written']} shard(s) written ({done['dropped']} replacing statistics "
          f"that failed their check); {done['stats_bytes'] / 2 ** 20:.1f} MiB beside "
          f"{done['feature_bytes'] / 2 ** 20:.1f} MiB of features ({100 * share:.2f}%)")
    return 0


def _add_info(p) -> None:
    p.add_argument("cache", help="feature cache directory")


def _run_info(args) -> int:
    from ..data import read_manifest
    from ..data.cache import shard_groups, stats_groups
    m = read_manifest(args.cache)
    summary = {k: m[k] for k in ("version", "config", "num_images", "feature_shape", "dtype", "shard_size",
                                 "complete")}
    summary["views"] = m.get("views", 1)   # version 2: augmented views of view_images training images
    if "view_images" in m:
        summary["view_images"] = m["view_images"]
    summary["shards_done"] = sum(s is not None for group in shard_groups(m) for s in group)
    # Version 3: shards whose LayerNorm statistics are recorded (not checked here: c2f cache-stats checks them).
    summary["stats_done"] = sum(s is not None for group in stats_groups(m) for s in group) if "stats" in m else 0
    summary["num_classes"], summary["num_attributes"] = len(m["class_names"]), len(m["attribute_names"])
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


COMMANDS = {
    "train": ("train the C2F head on a feature cache, or from images with --cub (no arguments: the demo)",
              _add_train, _run_train),
    "eval": ("evaluate a run or checkpoint on a split of a feature cache", _add_eval, _run_eval),
    "predict": ("predict classes and attributes for cached features or image files", _add_predict, _run_predict),
    "runs": ("list runs with their best metrics", _add_runs, _run_runs),
    "extract": ("cache a frozen backbone's features of CUB images", _add_extract, _run_extract),
    "synth": ("write a synthetic feature cache (learnable classes, attributes, parts)", _add_synth, _run_synth),
    "cache-stats": ("give a feature cache made before version 3 (or with a damaged statistics file) its "
                    "per-token LayerNorm statistics", _add_cache_stats, _run_cache_stats),
    "info": ("print a feature cache's manifest summary (JSON)", _add_info, _run_info),
}
