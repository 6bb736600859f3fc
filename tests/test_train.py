"""Training end to end on a tiny synthetic cache: learning, run directory, stages, exact resume, CLI."""
import json
import os

import numpy as np
import pytest
import torch

from c2f.cli import main
from c2f.data import synthesize
from c2f.train import TrainConfig, average_precision, classification_metrics, split_rows, train

TINY = dict(num_classes=5, images_per_class=32, num_attributes=12, dim=32, grid=7, num_locations=4,
            test_fraction=0.25, classes_per_genus=1, shard_size=32, progress=False)
TIMING = ("data_wait_s", "compute_s", "wait_frac", "epoch_s")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthesize(str(tmp_path_factory.mktemp("synth") / "cache"), **TINY)


def config(cache, run_dir, **kw):
    base = dict(features=cache, run_dir=str(run_dir), epochs=4, batch_size=8, lr=1e-2, num_workers=0,
                progress=False, plots=False, head="reference")
    return TrainConfig(**{**base, **kw})


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in f]


def test_joint_training_learns_and_writes_the_run(cache, tmp_path):
    result = train(config(cache, tmp_path / "run", epochs=6, plots=True))
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "final.json", "curves.png", "attention.png"):
        assert (run / name).is_file(), name
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for key in ("train_reg", "train_ce", "val_reg", "val_ce", "val_top1", "val_top5", "val_mean_class_acc",
                "val_attr_map", "val_attr_acc"):
        assert all(np.isfinite(r[key]) for r in recs), key
    assert recs[-1]["train_reg"] < recs[0]["train_reg"]
    test = result["test"]
    assert test["n"] == 40 and test["top1"] >= 0.5, test          # chance is 0.2
    assert test["attr_map"] > 0.75, test
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "rng", "epoch"} <= set(ckpt) and ckpt["epoch"] == 6
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_resume_continues_exactly(cache, tmp_path):
    straight = train(config(cache, tmp_path / "a", epochs=3, mixup_pairing="random"))
    assert train(config(cache, tmp_path / "b", epochs=3, mixup_pairing="random", stop_after=1)) == {}
    assert len(records(tmp_path / "b")) == 1
    resumed = main(["train", "--resume", "--run-dir", str(tmp_path / "b"), "--no-progress"])
    assert resumed == 0
    assert records(tmp_path / "a") == records(tmp_path / "b")
    with open(tmp_path / "b" / "final.json") as f:
        assert json.load(f)["test"] == straight["test"]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_stages_train_only_their_parameters(cache, tmp_path):
    train(config(cache, tmp_path / "att", stage="attention", epochs=1))
    att = torch.load(tmp_path / "att" / "best.pt", weights_only=False)["model"]
    assert torch.load(tmp_path / "att" / "last.pt", weights_only=False)["epoch"] == 1
    rec = records(tmp_path / "att")[0]
    assert rec["train_ce"] is None and rec["train_reg"] > 0
    train(config(cache, tmp_path / "fine", stage="fine", freeze_attention=True, epochs=1,
                 init=str(tmp_path / "att" / "best.pt")))
    fine = torch.load(tmp_path / "fine" / "best.pt", weights_only=False)["model"]
    for k in att:
        same = torch.equal(att[k], fine[k])
        assert same == (not k.startswith("classifier")), k
    assert records(tmp_path / "fine")[0]["train_reg"] is None


def test_metrics_helpers():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.1, 0.2]])
    pos = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    np.testing.assert_allclose(average_precision(scores, pos), [(1 + 2 / 3) / 2, (1 + 1) / 2])
    m = classification_metrics(np.array([[3.0, 1, 0], [0, 1, 2], [0, 2, 1], [5, 0, 0]]), np.array([0, 2, 2, 1]), 3)
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    assert m["mean_class_acc"] == pytest.approx((1 + 0.5 + 0) / 3)
    labels = np.repeat(np.arange(4), 10)
    is_train = np.tile(np.arange(10) < 7, 4)
    tr, va, te = split_rows(labels, is_train, 0.3, seed=0)
    assert len(va) == 8 and len(tr) == 20 and len(te) == 12 and not set(tr) & set(va)
    assert np.bincount(labels[va]).tolist() == [2] * 4


def test_cli_synth_and_info(tmp_path, capsys):
    out = str(tmp_path / "c")
    assert main(["synth", out, "--classes", "2", "--images-per-class", "3", "--attributes", "4", "--dim", "8",
                 "--grid", "3", "--locations", "2"]) == 0
    capsys.readouterr()
    assert main(["info", out]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["feature_shape"] == [8, 3, 3] and info["num_images"] == 6 and info["complete"]
    assert info["config"]["source"] == "synth"
    with pytest.raises(ValueError, match="batch_size: 64 exceeds"):
        train(config(out, tmp_path / "r", batch_size=64))


@pytest.mark.parametrize("attr_target, attr_loss", [("binary", "mse"), ("calibrated", "bce"), ("class", "mse")])
def test_fused_head_trains(cache, tmp_path, attr_target, attr_loss):
    """The default head (c2f.nn.C2FHead) through the same loop, with K = 2 mixup views."""
    result = train(config(cache, tmp_path / "fused", head="fused", epochs=1, mixup_views=2,
                          attr_target=attr_target, attr_loss=attr_loss))
    rec = records(tmp_path / "fused")[0]
    assert np.isfinite(rec["train_ce"]) and np.isfinite(rec["train_reg"]) and result["test"]["n"] == 40
