"""Training from images (c2f train --cub) and augmented caches (c2f extract --views): tiny CUB-format trees
through a tiny TorchScript backbone; keyed, resumable augmentation."""
import json
import math
import os

import numpy as np
import pytest
import torch

from c2f.app.cli import main
from c2f.app.data import FeatureCache, extract, read_cub, read_manifest
from c2f.app.data.backbones import ImageFolderDataset
from c2f.app.data.images import CROP_RATIO, Augment, AugmentedView, CenterView, ImageRows, crop_box
from c2f.app.data.loader import drawn_views
from c2f.app.data.manifest import features_manifest
from c2f.model_file import safe_load
from tests.test_data import SIDE, TinyBackbone, write_cub

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_cub(root / "cub")
    torch.manual_seed(0)
    torch.jit.script(TinyBackbone()).save(str(root / "bb.pt"))
    return root


def flags(tree):
    return ["--cub", str(tree / "cub"), "--backbone", str(tree / "bb.pt"), "--image-size", str(SIDE),
            "--batch-size", "2", "--num-workers", "0", "--no-progress", "--no-plots", "--head", "reference",
            "--amp", "off"]


def model_of(run):
    return safe_load(os.path.join(run, "last.pt"))["model"]


def same_models(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_train_from_images_writes_a_run_that_resumes_exactly(tree, tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(["train", *flags(tree), "--epochs", "2", "--run-dir", full]) == 0
    records = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["backbone_s"] > 0 for r in records)
    assert os.path.isfile(os.path.join(full, "best.pt"))
    saved = json.load(open(os.path.join(full, "config.json")))
    assert saved["cub"] == str(tree / "cub") and saved["features"] is None
    assert saved["_run"]["backbone"]["backbone_sha256"] and saved["_run"]["cache_identity"]
    # Stopped after one epoch and resumed, with workers this time: the same augmentations, the same model.
    assert main(["train", *flags(tree), "--epochs", "2", "--stop-after", "1", "--run-dir", part]) == 0
    assert main(["train", "--resume", part, "--no-progress", "--num-workers", "2"]) == 0
    assert same_models(model_of(full), model_of(part))
    # eval and predict --images work on the run; eval reproduces the run's test metrics.
    capsys.readouterr()
    assert main(["eval", full, "--out", str(tmp_path / "e.json")]) == 0
    final = json.load(open(os.path.join(full, "final.json")))["test"]
    assert json.load(open(tmp_path / "e.json"))["top1"] == pytest.approx(final["top1"])
    image = read_cub(str(tree / "cub")).image_paths[0]
    assert main(["predict", full, "--images", image]) == 0
    assert os.path.basename(image) in capsys.readouterr().out


def test_resume_refuses_another_backbone(tree, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *flags(tree), "--epochs", "2", "--stop-after", "1", "--run-dir", run]) == 0
    other = str(tmp_path / "other.pt")
    torch.manual_seed(1)
    torch.jit.script(TinyBackbone()).save(other)
    capsys.readouterr()
    assert main(["train", "--resume", run, "--backbone", other, "--no-progress"]) == 2
    assert "--backbone" in capsys.readouterr().err


def exit_code(args):
    """The CLI's exit code, whether the parser (SystemExit) or the command reported the error."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("args, flag", [
    (["--features", "x"], "--cub"), ([], "--backbone"), (["--backbone", "nope.pt"], "--backbone"),
    (["--weights", "nope.pt"], "--weights"), (["--crop-scale", "0"], "--crop-scale"), (["--hflip", "1.5"], "--hflip"),
    (["--eval-crop", "2"], "--eval-crop"), (["--image-size", "0"], "--image-size")])
def test_bad_image_flags_name_the_flag(tree, tmp_path, capsys, args, flag):
    base = ["train", "--cub", str(tree / "cub"), "--run-dir", str(tmp_path / "r")]
    if "--backbone" not in args and flag != "--backbone":
        base += ["--backbone", str(tree / "bb.pt")]
    assert exit_code([*base, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"argument {flag}" in err[0]
    assert not os.path.exists(tmp_path / "r")


def test_backbone_without_cub_and_bad_extract_views(tree, tmp_path, capsys):
    assert main(["train", "--backbone", str(tree / "bb.pt")]) == 2
    assert "argument --backbone" in capsys.readouterr().err
    for bad in (["--views", "0"], ["--crop-scale", "1.5"], ["--seed", "-1"]):
        args = ["extract", str(tree / "cub"), str(tmp_path / "c"), "--backbone", str(tree / "bb.pt"), *bad]
        assert exit_code(args) == 2
        assert f"argument {bad[0]}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- augmentation

def test_views_are_keyed_by_seed_epoch_and_row(tree):
    rec = read_cub(str(tree / "cub"))
    images = ImageFolderDataset(rec.image_paths, SIDE)
    targets = rec.attributes
    rows = ImageRows(images, rec.labels, targets, AugmentedView(Augment(SIDE, 0.3, 0.5)), CenterView(SIDE), 7)
    whole = rows[(3, list(range(6)))]["x"]
    parts = torch.cat([rows[(3, [4, 5, 0])]["x"], rows[(3, [1, 2, 3])]["x"]])
    assert torch.equal(whole, parts[[2, 3, 4, 5, 0, 1]])          # per row, whatever the batch
    assert not torch.equal(whole, rows[(4, list(range(6)))]["x"])   # another epoch, other views
    assert torch.equal(rows[[0, 1]]["x"], rows[[0, 1]]["x"])       # evaluation: deterministic
    assert not torch.equal(rows[[0, 1]]["x"], whole[:2])


def draws(sampler, n, width, height, scale):
    boxes = np.array([sampler(width, height, scale, i) for i in range(n)], dtype=np.float64)
    area = boxes[:, 2] * boxes[:, 3] / (width * height)
    return area, np.log(boxes[:, 2] / boxes[:, 3])


def ours(width, height, scale, i):
    return crop_box(width, height, (scale, 1.0), CROP_RATIO, np.random.default_rng([0, i]))


def ks(a, b):
    grid = np.sort(np.concatenate([a, b]))
    return np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                  - np.searchsorted(np.sort(b), grid, "right") / len(b)).max()


def test_crop_distribution():
    """Inside its ranges, and on a large square image (rejections rare) area ~ U[scale, 1] and log-ratio ~
    U[log 3/4, log 4/3]: a two-sample KS distance against those uniforms, small enough to fail a wrong sampler."""
    rng = np.random.default_rng(1)
    area, log_ratio = draws(ours, 4000, 1000, 1000, 0.25)
    assert area.min() >= 0.24 and area.max() <= 1.0 and np.abs(log_ratio).max() <= math.log(4 / 3) + 0.01
    # A draw is placed at once unless sqrt(area * 4/3) > 1: below area 3/4 the sample is uniform.
    assert ks(area[area < 0.75], rng.uniform(0.25, 0.75, 4000)) < 0.05
    assert ks(log_ratio[area < 0.75], rng.uniform(math.log(3 / 4), math.log(4 / 3), 4000)) < 0.05
    assert crop_box(40, 10, (0.9, 1.0), CROP_RATIO, np.random.default_rng(0)) == (13, 0, 13, 10)   # the fallback


def test_crop_matches_torchvision_in_distribution():
    transforms = pytest.importorskip("torchvision.transforms")
    torch.manual_seed(0)
    img = torch.zeros(3, 150, 200)

    def theirs(width, height, scale, i):
        top, left, h, w = transforms.RandomResizedCrop.get_params(img, (scale, 1.0), CROP_RATIO)
        return left, top, w, h
    for scale in (0.08, 0.25):
        a, b = draws(ours, 3000, 200, 150, scale), draws(theirs, 3000, 200, 150, scale)
        assert ks(a[0], b[0]) < 0.06 and ks(a[1], b[1]) < 0.06


def test_flip_rate_and_center_view():
    from PIL import Image
    arr = np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3)
    img = Image.fromarray(arr)
    view = AugmentedView(Augment(8, 1.0, 0.5))
    flips = [view(img, [0, i]) for i in range(200)]
    assert all(f.size == (8, 8) for f in flips)
    rate = np.mean([np.asarray(f)[0, 0, 0] > np.asarray(f)[0, -1, 0] for f in flips])
    assert 0.4 < rate < 0.6
    centre = np.asarray(CenterView(20, 1.0)(img))          # crop 1: the centre square, at its own size
    assert np.array_equal(centre, arr[:, 10:30])


# ---------------------------------------------------------------------------------- augmented caches

EXTRACT = dict(image_size=SIDE, batch_size=3, shard_size=4, num_workers=0, progress=False)


def test_extract_views_and_train_on_them(tree, tmp_path, capsys):
    cub, bb = str(tree / "cub"), str(tree / "bb.pt")
    plain = FeatureCache(extract(cub, str(tmp_path / "plain"), bb, **EXTRACT))
    made = read_manifest(plain.directory)   # version 3: the features of version 1 (one view) with statistics
    assert made["version"] == 3 and features_manifest(made)["version"] == 1 and plain.views == 1
    out = str(tmp_path / "views")
    assert main(["extract", cub, out, "--backbone", bb, "--image-size", str(SIDE), "--views", "2",
                 "--shard-size", "4", "--num-workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", out]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == 3 and info["views"] == 2 and info["view_images"] == int(plain.is_train.sum())
    assert features_manifest(read_manifest(out))["version"] == 2   # version 2's views, with statistics
    cache = FeatureCache(out)
    rows = np.arange(len(cache))
    train = np.flatnonzero(cache.is_train)
    assert np.array_equal(cache.read(rows), plain.read(rows))           # view 0: the cache without views
    assert not np.array_equal(cache.read(train, np.ones_like(train)), cache.read(train))
    with pytest.raises(IndexError, match="views"):
        cache.read(np.flatnonzero(~cache.is_train)[:1], [1])            # test images have one view
    a, b = drawn_views(cache, 0, 1), drawn_views(cache, 0, 2)
    assert np.array_equal(a, drawn_views(cache, 0, 1)) and not np.array_equal(a, b)
    assert set(a[train]) == {0, 1} and not a[~cache.is_train].any()
    common = ["--features", out, "--batch-size", "2", "--num-workers", "0", "--no-progress", "--no-plots",
              "--head", "reference", "--amp", "off", "--epochs", "2"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(["train", *common, "--run-dir", full]) == 0
    assert main(["train", *common, "--stop-after", "1", "--run-dir", part]) == 0
    assert main(["train", "--resume", part, "--no-progress", "--num-workers", "1"]) == 0
    assert same_models(model_of(full), model_of(part))
    plain_run = str(tmp_path / "plain-run")
    assert main(["train", *common, "--features", plain.directory, "--run-dir", plain_run]) == 0
    assert not same_models(model_of(full), model_of(plain_run))      # the views were drawn, not view 0 only
