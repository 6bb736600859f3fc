"""Training end to end on a tiny synthetic cache: learning, run directory, stages, exact resume, metrics."""
import json
import os

import numpy as np
import pytest
import torch

from c2f import losses
from c2f.app import TrainConfig, Trainer, average_precision, classification_metrics, split_rows, train
from c2f.app.cli import main
from c2f.app.data import synthesize
from c2f.model_file import load_model, safe_load

TINY = dict(num_classes=5, images_per_class=32, num_attributes=12, dim=32, grid=7, num_locations=4,
            test_fraction=0.25, classes_per_genus=1, shard_size=32, progress=False)
TIMING = ("data_wait_s", "compute_s", "wait_frac", "epoch_s")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthesize(str(tmp_path_factory.mktemp("synth") / "cache"), **TINY)


def config(cache, run_dir, **kw):
    """amp off: --amp auto picks bf16 on a CPU with AVX512-BF16/AMX; these tests check fp32 numerics."""
    base = dict(features=cache, run_dir=str(run_dir), epochs=4, batch_size=8, lr=1e-2, num_workers=0,
                progress=False, plots=False, head="reference", amp="off")
    return TrainConfig(**{**base, **kw})


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in f]


def test_joint_training_learns_and_writes_the_run(cache, tmp_path):
    result = train(config(cache, tmp_path / "run", epochs=6, plots=True, save_attention=3))
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt", "best.safetensors",
                 "final.json", "curves.png", "attention.png", "attention.npy", "attention_rows.npy"):
        assert (run / name).is_file(), name
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for key in ("train_reg", "train_ce", "train_grad_norm", "val_reg", "val_ce", "val_top1", "val_top5",
                "val_mean_class_acc", "val_attr_map", "val_attr_acc"):
        assert all(np.isfinite(r[key]) for r in recs), key
    assert recs[-1]["train_reg"] < recs[0]["train_reg"]
    test = result["test"]
    assert test["n"] == 40 and test["top1"] >= 0.5, test          # chance is 0.2
    assert test["attr_map"] > 0.75, test
    # Every checkpoint loads with weights_only=True (RNG states are tensors and plain containers).
    ckpt = safe_load(str(run / "last.pt"))
    assert {"model", "optimizer", "scheduler", "rng", "epoch"} <= set(ckpt) and ckpt["epoch"] == 6
    assert not [f for f in os.listdir(run) if ".tmp" in f]
    # metrics.csv holds the jsonl's rows.
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 7 and header[0] == "epoch" and "val_top1" in header
    assert float(lines[-1].split(",")[header.index("val_top1")]) == pytest.approx(recs[-1]["val_top1"])
    # The attention maps of the first test images, on the grid.
    maps, rows = np.load(run / "attention.npy"), np.load(run / "attention_rows.npy")
    assert maps.shape == (3, 12, 7, 7) and rows.shape == (3,)
    np.testing.assert_allclose(maps.sum((2, 3)), 1.0, atol=1e-5)


def test_best_model_rebuilds_from_the_file_alone(cache, tmp_path):
    train(config(cache, tmp_path / "run", epochs=1, head="fused", num_heads=2))
    best = str(tmp_path / "run" / "best.pt")
    ckpt = safe_load(best)
    assert ckpt["model_args"] == dict(dim=32, num_parts=12, num_classes=5, num_heads=2, qkv_bias=False,
                                      qk_scale=pytest.approx(16 ** -0.5), eps=1e-5, head_reduce="mean",
                                      materialize_parts=False,
                                      backend="auto")
    assert ckpt["model_class"] == "c2f.c2f_head.C2FHead" and ckpt["class_names"][0] == "class000"
    for path in (best, str(tmp_path / "run" / "best.safetensors")):
        model = load_model(path)
        assert type(model).__name__ == "C2FHead" and model.attention.num_heads == 2
        for k, v in ckpt["model"].items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    from c2f.reference import C2FHead
    assert type(load_model(best, cls=C2FHead)) is C2FHead


def test_resume_continues_exactly(cache, tmp_path):
    straight = train(config(cache, tmp_path / "a", epochs=3, mixup_pairing="random"))
    assert train(config(cache, tmp_path / "b", epochs=3, mixup_pairing="random", stop_after=1)) == {}
    assert len(records(tmp_path / "b")) == 1
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "b"), "--no-progress"]) == 0
    assert records(tmp_path / "a") == records(tmp_path / "b")
    with open(tmp_path / "b" / "final.json") as f:
        assert json.load(f)["test"] == straight["test"]
    a, b = safe_load(str(tmp_path / "a" / "last.pt"))["model"], safe_load(str(tmp_path / "b" / "last.pt"))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_extends_a_finished_run_with_a_rebuilt_schedule(cache, tmp_path):
    run = tmp_path / "run"
    train(config(cache, run, epochs=2, min_lr_ratio=0.5))
    lr_end = records(run)[-1]["lr"]
    assert lr_end == pytest.approx(1e-2 * 0.5, rel=1e-6)            # the 2-epoch schedule decayed fully
    assert main(["train", "--resume", str(run), "--epochs", "4", "--no-progress"]) == 0
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    # Rebuilt for 4 epochs: epoch 3 runs above the floor, epoch 4 ends on it.
    assert recs[2]["lr"] > 1e-2 * 0.5 * 1.01 and recs[3]["lr"] == pytest.approx(1e-2 * 0.5, rel=1e-6)
    assert json.load(open(run / "config.json"))["epochs"] == 4
    assert safe_load(str(run / "last.pt"))["epoch"] == 4


def test_stages_train_only_their_parameters(cache, tmp_path, caplog):
    train(config(cache, tmp_path / "att", stage="attention", epochs=1))
    att = safe_load(str(tmp_path / "att" / "best.pt"))["model"]
    assert safe_load(str(tmp_path / "att" / "last.pt"))["epoch"] == 1
    rec = records(tmp_path / "att")[0]
    assert rec["train_ce"] is None and rec["train_reg"] > 0
    with caplog.at_level("WARNING", logger="c2f"):
        train(config(cache, tmp_path / "fine", stage="fine", freeze_attention=True, epochs=1,
                     init=str(tmp_path / "att" / "best.pt")))
    assert "without --init" not in caplog.text
    fine = safe_load(str(tmp_path / "fine" / "best.pt"))["model"]
    for k in att:
        same = torch.equal(att[k], fine[k])
        assert same == (not k.startswith("classifier")), k
    assert records(tmp_path / "fine")[0]["train_reg"] is None


def test_fine_frozen_without_init_warns(cache, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="c2f"):
        Trainer(config(cache, tmp_path / "r", stage="fine", freeze_attention=True, epochs=1)).close()
    assert "--stage fine --freeze-attention without --init" in caplog.text


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


def brute_force_ap(scores, positives):
    """sum_k (R_k - R_{k-1}) P_k with one point per distinct threshold, straight from the definition."""
    ap = []
    for s, y in zip(scores.T, positives.T, strict=True):
        total, prev_recall, value = y.sum(), 0.0, 0.0
        for t in np.unique(s)[::-1]:
            chosen = s >= t
            recall = (y & chosen).sum() / total
            value += (recall - prev_recall) * (y & chosen).sum() / chosen.sum()
            prev_recall = recall
        ap.append(value)
    return np.array(ap)


def test_average_precision_is_exact_on_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (60, 25)).astype(np.float32) / 4          # 4 values: ties everywhere
    scores[:, :5] = rng.random((60, 5))                                   # and a few columns without ties
    positives = rng.random((60, 25)) < 0.4
    expected = brute_force_ap(scores, positives)
    np.testing.assert_allclose(average_precision(scores, positives), expected, rtol=1e-12, atol=1e-12)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(60)
        np.testing.assert_allclose(average_precision(scores[order], positives[order]), expected, rtol=1e-12)
    one_class = np.zeros((4, 2), dtype=bool)
    one_class[:, 1] = True
    assert np.isnan(average_precision(np.ones((4, 2)), one_class)).all()


def test_soft_cross_entropy_is_torch_cross_entropy_with_probabilities():
    logits = torch.randn(3, 4, 7)
    targets = torch.softmax(torch.randn(3, 4, 7), -1)
    expected = -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(losses.soft_cross_entropy(logits, targets), expected)
    assert losses.soft_cross_entropy(logits.bfloat16(), targets).dtype == torch.float32


@pytest.mark.parametrize("attr_target, attr_loss", [("binary", "mse"), ("calibrated", "bce"), ("class", "mse")])
def test_fused_head_trains(cache, tmp_path, attr_target, attr_loss):
    """The default head (c2f.nn.C2FHead) through the same loop, with K = 2 mixup views, fed fp16 as cached."""
    trainer = Trainer(config(cache, tmp_path / "fused", head="fused", epochs=1, mixup_views=2,
                             attr_target=attr_target, attr_loss=attr_loss))
    dtypes = []
    trainer.head.register_forward_pre_hook(lambda module, args: dtypes.append(args[0].dtype))
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    rec = records(tmp_path / "fused")[0]
    assert np.isfinite(rec["train_ce"]) and np.isfinite(rec["train_reg"]) and result["test"]["n"] == 40
    assert set(dtypes) == {torch.float16}          # the loader's fp16 batches, no fp32 copy


def test_attention_plot_shares_one_colour_scale_with_a_colour_bar(tmp_path, monkeypatch):
    from c2f.app import plots
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    monkeypatch.setattr(plots._pyplot(), "close", lambda fig: None)
    attn = np.random.default_rng(0).random((2, 6, 9)).astype(np.float32)
    attn[1, 5] *= 4                                          # one map much brighter than the rest
    plots.attention_maps(attn, (3, 3), [f"a{i}" for i in range(6)], [0, 1], ["x", "y"], str(tmp_path / "a.png"),
                         attributes=[0, 5])
    (fig,) = figures
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 4 and {im.get_clim() for im in images} == {(0.0, float(attn[:, [0, 5]].max()))}
    assert len(fig.axes) == 5                                # 2 x 2 maps and the colour bar
