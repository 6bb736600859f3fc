"""The c2f command as a user meets it: help and defaults, one-line errors, config files, eval, predict,
runs, logging, TensorBoard."""
import argparse
import csv
import json
import os
import sys
import types

import numpy as np
import pytest

from c2f.app.cli import build_parser, main
from c2f.app.cli.options import HelpFormatter
from c2f.app.data import FeatureCache, synthesize
from tests.tamper import nan_rows

SMALL = dict(num_classes=4, images_per_class=8, num_attributes=6, dim=16, grid=4, num_locations=3,
             test_fraction=0.25, classes_per_genus=1, shard_size=16, progress=False)
# --amp off: auto picks bf16 on a CPU with AVX512-BF16/AMX, and eval (--amp off) must reproduce training's metrics.
FLAGS = ["--batch-size", "4", "--lr", "0.01", "--num-workers", "0", "--no-progress", "--no-plots",
         "--val-fraction", "0.25", "--amp", "off"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthesize(str(tmp_path_factory.mktemp("small") / "cache"), **SMALL)


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    """A finished 2-epoch run of the fused head on the small cache."""
    path = str(tmp_path_factory.mktemp("runs") / "joint-a")
    assert main(["train", "--features", cache, "--run-dir", path, "--epochs", "2", *FLAGS]) == 0
    return path


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices, c2f=parser)


def test_every_option_has_help_and_shows_its_default():
    for name, parser in subparsers().items():
        formatter = HelpFormatter(name)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings and not action.required:
                assert "default: " in formatter._get_help_string(action), (name, action.dest)
    train = subparsers()["train"].format_help()
    for text in ("--min-lr-ratio", "--extra KEY=VALUE", "--amp {auto,bf16,fp16,off}", "--compile",
                 "--skip-nonfinite", "--backend {auto,triton,torch}", "--mixup-mode {binary,blend,part}",
                 "(default: 0.003)", "rebuilt for the new total"):
        assert text in train, text


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"c2f {__import__('c2f').__version__}")


@pytest.mark.parametrize("argv, expected", [
    (["train", "--lr", "-1"], "argument --lr: must be > 0, got -1.0"),
    (["train", "--num-workers", "-1"], "argument --num-workers: must be >= 0, got -1"),
    (["train", "--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
    (["train", "--device", "cuda"], "argument --device: 'cuda' asked for, but CUDA is not available"),
    (["train", "--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["train", "--config", "missing.toml"], "argument --config: missing.toml not found"),
    (["train", "--features", "nowhere"], "nowhere"),
    (["train", "--resume"], "argument --resume: needs the run directory"),
    (["extract", "cub", "out", "--backbone", "b.pt", "--image-size", "0"], "argument --image-size: must be > 0"),
    (["extract", "cub", "out", "--backbone", "b.pt", "--batch-size", "0"], "argument --batch-size: must be > 0"),
    (["extract", "cub", "out", "--backbone", "b.pt"], "images.txt not found"),
    (["eval", "nowhere"], "nowhere: no such run directory or checkpoint file"),
    (["synth", "s", "--test-fraction", "1.5"], "argument --test-fraction: must be in [0, 1)"),
    # Every float flag is finite: --lr inf trained until the first loss was inf (exit 1).
    (["train", "--lr", "inf", "--features", "nowhere"], "argument --lr: must be a finite number, got inf"),
    (["train", "--weight-decay", "nan", "--features", "nowhere"], "argument --weight-decay: must be a finite number"),
    (["train", "--warmup-epochs", "1e999", "--features", "nowhere"], "argument --warmup-epochs: must be a finite"),
    (["synth", "s", "--noise", "inf"], "argument --noise: must be a finite number, got inf"),
])
def test_user_errors_are_one_line_with_exit_code_2(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:          # argparse's own checks
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert expected in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []                        # nothing was created on the way


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from c2f.errors import ConfigError
    with pytest.raises(ConfigError, match="CUDA is not available"):
        main(["train", "--device", "cuda", "--debug"])


def test_config_files_and_flags(cache, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f'features = "{cache}"\nepochs = 1\nlr = 0.02\nmin-lr-ratio = 0.5\nhead = "reference"\n'
                    'batch_size = 4\nnum_workers = 0\nplots = false\nprogress = false\n'
                    '[extra]\nnote = "from toml"\n')
    assert main(["train", "--config", str(toml), "--lr", "0.03", "--extra", "tag=[1, 2]",
                 "--run-dir", str(tmp_path / "a")]) == 0
    saved = json.load(open(tmp_path / "a" / "config.json"))
    assert saved["lr"] == 0.03 and saved["min_lr_ratio"] == 0.5 and saved["epochs"] == 1
    assert saved["extra"] == {"note": "from toml", "tag": [1, 2]} and saved["head"] == "reference"
    # The saved config.json reruns the run, in a new directory.
    assert main(["train", "--config", str(tmp_path / "a" / "config.json"), "--run-dir", str(tmp_path / "b")]) == 0
    again = json.load(open(tmp_path / "b" / "config.json"))
    assert {k: v for k, v in again.items() if k != "_run"} == {k: v for k, v in saved.items() if k != "_run"}
    a = [json.loads(ln)["train_reg"] for ln in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(ln)["train_reg"] for ln in open(tmp_path / "b" / "metrics.jsonl")]
    assert a == b
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochz": 3, "lr": "fast"}')
    capsys.readouterr()
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown setting(s) epochz" in capsys.readouterr().err


def test_eval_prints_and_writes_the_training_metrics(run, cache, tmp_path, capsys):
    final = json.load(open(os.path.join(run, "final.json")))["test"]
    capsys.readouterr()
    assert main(["eval", run]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test: top-1 ") and "attr-mAP" in out
    written = json.load(open(os.path.join(run, "eval-test.json")))
    for key in ("n", "top1", "top5", "mean_class_acc", "ce", "reg", "attr_acc", "attr_map"):
        assert written[key] == pytest.approx(final[key], rel=1e-6, abs=1e-9), key
    # The run's validation rows reproduce the best epoch's validation metrics.
    best = json.load(open(os.path.join(run, "final.json")))["best_epoch"]
    val = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))][best - 1]
    out_csv = str(tmp_path / "val.csv")
    assert main(["eval", os.path.join(run, "best.pt"), "--features", cache, "--split", "val", "--out", out_csv,
                 "--save-attention", "2"]) == 0
    row = next(csv.DictReader(open(out_csv)))
    assert float(row["top1"]) == pytest.approx(val["val_top1"]) and float(row["reg"]) == pytest.approx(val["val_reg"])
    assert np.load(str(tmp_path / "val-attention.npy")).shape == (2, 6, 4, 4)


def test_predict_features_and_runs_listing(run, cache, tmp_path, capsys):
    out = str(tmp_path / "pred.csv")
    assert main(["predict", run, "--features", cache, "--out", out, "--top-k", "3"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 8 and set(rows[0]) >= {"sample", "label", "pred", "pred_name", "prob", "top_k", "attributes"}
    assert all(len(r["top_k"].split()) == 3 and r["pred"] == r["top_k"].split()[0] for r in rows)
    accuracy = np.mean([r["pred"] == r["label"] for r in rows])
    final = json.load(open(os.path.join(run, "final.json")))["test"]
    assert accuracy == pytest.approx(final["top1"])
    capsys.readouterr()
    assert main(["runs", os.path.dirname(run)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "stage", "head"] and "joint-a" in table[1] and "done" in table[1]
    assert f"{final['top1']:.1%}" in table[1]


def test_logging_flags(cache, tmp_path, capsys):
    log_file = tmp_path / "train.log"
    assert main(["train", "--features", cache, "--run-dir", str(tmp_path / "q"), "--epochs", "1", "--quiet",
                 "--log-file", str(log_file), "--head", "reference", *FLAGS]) == 0
    captured = capsys.readouterr()
    assert "epoch 1/1" not in captured.err and "held-out test split" in captured.out
    assert "INFO c2f.app.trainer: epoch 1/1" in log_file.read_text()
    assert main(["train", "--features", cache, "--run-dir", str(tmp_path / "v"), "--epochs", "1",
                 "--head", "reference", *FLAGS]) == 0
    assert "epoch 1/1" in capsys.readouterr().err


def test_tensorboard_writer_when_installed(cache, tmp_path, monkeypatch):
    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            scalars.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            pass

        def close(self):
            scalars.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    assert main(["train", "--features", cache, "--run-dir", str(tmp_path / "tb"), "--epochs", "2", "--tensorboard",
                 "--head", "reference", *FLAGS]) == 0
    assert scalars[0] == ("dir", str(tmp_path / "tb" / "tensorboard")) and scalars[-1] == ("closed", None)
    assert ("train/reg", 1) in scalars and ("val/top1", 2) in scalars
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"--tensorboard needs tensorboard, which is not installed: "
                                          r"pip install 'c2f-fgvc\[tensorboard\]'"):
        main(["train", "--features", cache, "--run-dir", str(tmp_path / "none"), "--tensorboard", "--debug"])
    assert not (tmp_path / "none").exists()


def test_a_non_finite_float_in_a_config_file_is_refused(tmp_path, capsys):
    bad = tmp_path / "run.toml"
    bad.write_text("lr = inf\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "argument --lr: must be a finite number, got inf" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- non-finite rows

@pytest.fixture(scope="module")
def nan_cache(cache, tmp_path_factory):
    """The small cache with rows 3 (train) and 29 (test) set to NaN, their shards' sha256 updated."""
    return nan_rows(cache, str(tmp_path_factory.mktemp("nan") / "cache"), [3, 29])


def test_eval_and_predict_name_non_finite_rows_and_exit_1(run, nan_cache, tmp_path, capsys):
    """``c2f eval --split all`` printed ``ce nan reg nan`` and exited 0: now it names the split, the rows and the
    metrics and exits 1, or leaves the rows out with --skip-nonfinite and counts them."""
    assert FeatureCache(nan_cache).labels[29] is not None
    out = str(tmp_path / "all.json")
    for argv in (["eval", run, "--features", nan_cache, "--split", "all", "--out", out],
                 ["predict", run, "--features", nan_cache, "--split", "all"]):
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "on the all split: logits at cache rows [3, 29] (its ce, top1, top5, mean_class_acc would be " \
               "non-finite)" in err and "2 of 32 rows" in err and "--skip-nonfinite" in err, err
    assert not os.path.exists(out)
    assert main(["eval", run, "--features", nan_cache, "--split", "all", "--out", out, "--skip-nonfinite"]) == 0
    written = json.load(open(out))
    assert written["n"] == 30 and written["nonfinite_rows"] == 2 and np.isfinite(written["ce"])
    assert "2 non-finite rows left out" in capsys.readouterr().out
    pred = str(tmp_path / "pred.csv")
    assert main(["predict", run, "--features", nan_cache, "--split", "test", "--out", pred, "--skip-nonfinite"]) == 0
    assert len(list(csv.DictReader(open(pred)))) == 7 and "29" not in [r["sample"] for r in csv.DictReader(open(pred))]


# ------------------------------------------------------------------------------------------ --out

@pytest.mark.parametrize("command", ["eval", "predict"])
def test_out_errors_name_out_and_leave_nothing_behind(run, cache, tmp_path, capsys, command):
    """A missing directory named the temporary file; an existing directory left a stray ``*.tmp-PID``."""
    args = [command, run, "--features", cache]
    folder = tmp_path / "folder"
    folder.mkdir()
    for out, expected in ((tmp_path / "missing" / "m.json", "the directory " + str(tmp_path / "missing") +
                           " does not exist"), (folder, "is a directory")):
        capsys.readouterr()
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "argument --out: " in err and expected in err, err
    assert sorted(os.listdir(tmp_path)) == ["folder"] and os.listdir(folder) == []


def test_out_write_failures_name_out_and_leave_nothing_behind(run, cache, tmp_path, capsys, monkeypatch):
    """A write that fails after the checks (a full disk, say) is reported against --out; no temporary file stays."""
    import c2f.app.metrics

    def full_disk(path, text):
        def write(f):
            f.write(text[:10])
            raise OSError(28, "No space left on device")
        from c2f.files import atomic_write
        atomic_write(path, write, binary=False)

    monkeypatch.setattr(c2f.app.metrics, "atomic_write_text", full_disk)
    out = tmp_path / "m.json"
    assert main(["eval", run, "--features", cache, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"argument --out: cannot write {out}: No space left on device" in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- not a model file

def test_eval_and_predict_refuse_what_is_not_a_model_file(run, cache, tmp_path, capsys):
    """A text file raised ``internal error: KeyError: 105``; a run's current last.pt was said to be "written
    before c2f stored them"."""
    import torch
    text = tmp_path / "afile"
    text.write_text("i am not a checkpoint\n")
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    for source, expected in ((text, "not a readable checkpoint"),
                             (os.path.join(run, "last.pt"), "is a run's resume state (last.pt), not a model file"),
                             (listed, "not a c2f model file")):
        for command in ("eval", "predict"):
            capsys.readouterr()
            assert main([command, str(source), "--features", cache]) == 2, (command, source)
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and expected in err and "internal error" not in err, err


def test_head_reduce_flows_from_the_flag_to_the_saved_maps(cache, tmp_path):
    """--head-reduce max: in config.json, in best.pt's constructor arguments, and in the maps eval saves (each
    the max over the heads of the model's maps, so each row sums to at least one)."""
    run_dir = str(tmp_path / "max")
    assert main(["train", "--features", cache, "--run-dir", run_dir, "--epochs", "1", "--num-heads", "2",
                 "--head-reduce", "max", *FLAGS]) == 0
    assert json.load(open(os.path.join(run_dir, "config.json")))["head_reduce"] == "max"
    from c2f.model_file import load_model
    model = load_model(os.path.join(run_dir, "best.pt"))
    assert model.attention.head_reduce == "max" and model.attention.num_heads == 2
    assert main(["eval", os.path.join(run_dir, "best.pt"), "--features", cache, "--split", "test",
                 "--out", str(tmp_path / "t.csv"), "--save-attention", "2"]) == 0
    maps = np.load(str(tmp_path / "t-attention.npy"))
    assert maps.shape[:2] == (2, 6) and (maps.reshape(2, 6, -1).sum(-1) >= 1 - 1e-5).all()
    assert (maps.reshape(2, 6, -1).sum(-1) > 1 + 1e-4).any()    # a mean of maps would sum to exactly one


def test_training_reads_the_caches_token_statistics(cache, tmp_path, monkeypatch):
    """The synthetic cache carries the tokens' LayerNorm statistics: training passes them to the fused head (no
    statistics pass) and learns what it learns without them (--no-cached-stats), to fp32 rounding."""
    from c2f import c2f_head
    seen = []
    real = c2f_head.C2FHead.forward

    def spy(self, x, perm=None, mask=None, x_stats=None):
        seen.append(x_stats is not None)
        return real(self, x, perm, mask, x_stats=x_stats)
    monkeypatch.setattr(c2f_head.C2FHead, "forward", spy)
    runs = {}
    for flag in ("--cached-stats", "--no-cached-stats"):
        seen.clear()
        run_dir = tmp_path / flag.strip("-")
        assert main(["train", "--features", cache, "--run-dir", str(run_dir), "--epochs", "1", flag, *FLAGS]) == 0
        runs[flag] = ([json.loads(ln) for ln in open(run_dir / "metrics.jsonl")], list(seen))
    (with_stats, used), (without, unused) = runs["--cached-stats"], runs["--no-cached-stats"]
    assert used and all(used) and not any(unused)
    for key in ("train_reg", "train_ce", "val_reg", "val_ce"):
        assert with_stats[0][key] == pytest.approx(without[0][key], rel=1e-5), key
