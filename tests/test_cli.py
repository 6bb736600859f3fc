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

from c2f.cli import build_parser, main
from c2f.cli.options import HelpFormatter
from c2f.data import synthesize

SMALL = dict(num_classes=4, images_per_class=8, num_attributes=6, dim=16, grid=4, num_locations=3,
             test_fraction=0.25, classes_per_genus=1, shard_size=16, progress=False)
# fp32 throughout: "--amp auto" would pick bf16 on a CPU with AVX512-BF16, and eval's exact reproduction of
# the training metrics below holds in fp32 only (bf16 GEMMs round differently at another batch size).
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
    assert e.value.code == 0 and capsys.readouterr().out.startswith("c2f 0.1.0")


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
    assert "INFO c2f.trainer: epoch 1/1" in log_file.read_text()
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
