"""CUB reader, feature cache, extract (tiny TorchScript backbone, interrupted and resumed), synth, loader."""
import os
import sys
import types

import numpy as np
import pytest
import torch

from c2f.app.data import (
    BatchPlan,
    CacheError,
    CacheWriter,
    CUBFormatError,
    FeatureCache,
    ImageCheckError,
    attribute_targets,
    extract,
    load_backbone,
    make_loader,
    read_cub,
    read_manifest,
    synthesize,
)
from c2f.app.data.cache import sha256_file
from c2f.app.data.extract import ImageFolderDataset
from c2f.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

N_IMAGES, N_CLASSES, N_ATTRS, SIDE = 10, 3, 5, 16


def write_cub(root, attributes_under_dir=False, continuous=True, seed=0):
    """A CUB-format tree with the real files' quirks; returns the ground truth it wrote."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(root / "images", exist_ok=True)
    labels = np.arange(N_IMAGES) % N_CLASSES
    is_train = (np.arange(N_IMAGES) % 3) != 0
    present = rng.integers(0, 2, (N_IMAGES, N_ATTRS))
    certainty = rng.integers(1, 5, (N_IMAGES, N_ATTRS))
    lines = {k: [] for k in ("images", "labels", "split")}
    for i in range(N_IMAGES):
        rel = f"{labels[i] + 1:03d}.Class_{labels[i] + 1}/img_{i}.png"
        os.makedirs(root / "images" / os.path.dirname(rel), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIDE + i % 3, SIDE, 3), dtype=np.uint8)).save(root / "images" / rel)
        lines["images"].append(f"{i + 1} {rel}")
        lines["labels"].append(f"{i + 1} {labels[i] + 1}")
        lines["split"].append(f"{i + 1} {int(is_train[i])}")
    (root / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    (root / "classes.txt").write_text("".join(f"{k + 1} {k + 1:03d}.Class_{k + 1}\n" for k in range(N_CLASSES)))
    attr_dir = root / "attributes" if attributes_under_dir else root
    os.makedirs(attr_dir, exist_ok=True)
    (attr_dir / "attributes.txt").write_text("".join(f"{a + 1} has_thing::value_{a}\n" for a in range(N_ATTRS)))
    rows = []
    for i in range(N_IMAGES):
        for a in range(N_ATTRS):
            extra = " 0 12.5" if (i + a) % 4 == 0 else (" 3.1" if (i + a) % 7 == 0 else " 2.0")
            rows.append(f"{i + 1} {a + 1} {present[i, a]} {certainty[i, a]}{extra}")
    (attr_dir / "image_attribute_labels.txt").write_text("\n".join(rows) + "\n")
    cont = rng.uniform(0, 100, (N_CLASSES, N_ATTRS))
    if continuous:
        (attr_dir / "class_attribute_labels_continuous.txt").write_text(
            "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in cont))
    return dict(labels=labels, is_train=is_train, present=present, certainty=certainty, continuous=cont / 100)


@pytest.mark.parametrize("under_dir", [False, True])
def test_read_cub_quirks(tmp_path, under_dir):
    truth = write_cub(tmp_path, attributes_under_dir=under_dir)
    rec = read_cub(str(tmp_path))
    assert len(rec) == N_IMAGES and rec.image_ids.tolist() == list(range(1, N_IMAGES + 1))
    np.testing.assert_array_equal(rec.labels, truth["labels"])
    np.testing.assert_array_equal(rec.is_train, truth["is_train"])
    np.testing.assert_array_equal(rec.attributes, truth["present"])     # extra-field lines were kept
    np.testing.assert_array_equal(rec.certainty, truth["certainty"])
    np.testing.assert_allclose(rec.class_attributes, truth["continuous"], atol=1e-6)
    assert rec.attribute_names[1] == "has_thing::value_1" and rec.class_names[2] == "003.Class_3"
    assert all(os.path.isfile(p) for p in rec.image_paths)


def test_read_cub_errors_name_file_and_line(tmp_path):
    write_cub(tmp_path)
    path = tmp_path / "image_attribute_labels.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(CUBFormatError, match=r"image_attribute_labels.txt.*missing.*image 10, attribute 5"):
        read_cub(str(tmp_path))
    lines[6] = "7 2 yes 3"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CUBFormatError, match=r"image_attribute_labels.txt:7: is_present must be an integer"):
        read_cub(str(tmp_path))
    lines[6] = lines[5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CUBFormatError, match=r"image_attribute_labels.txt:7: second label"):
        read_cub(str(tmp_path))
    write_cub(tmp_path)
    (tmp_path / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(CUBFormatError, match=r"image_class_labels.txt: no class id for 9 image"):
        read_cub(str(tmp_path))


def test_attribute_targets():
    present = np.array([[1, 0, 1, 0]], dtype=np.float32)
    certainty = np.array([[4, 4, 1, 2]])
    np.testing.assert_array_equal(attribute_targets("binary", present, certainty, [0]), present)
    np.testing.assert_allclose(attribute_targets("calibrated", present, certainty, [0]), [[1.0, 0.0, 0.5, 0.25]])
    cls = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], dtype=np.float32)
    np.testing.assert_array_equal(attribute_targets("class", present, certainty, np.array([1]), cls), cls[[1]])
    with pytest.raises(ValueError, match="class_attribute_labels_continuous"):
        attribute_targets("class", present, certainty, [0], None)
    with pytest.raises(ValueError, match="must be one of"):
        attribute_targets("soft", present, certainty, [0])


class TinyBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 4, stride=4)

    def forward(self, x):
        return torch.relu(self.conv(x))


@pytest.fixture
def cub_and_backbone(tmp_path):
    write_cub(tmp_path / "cub")
    torch.manual_seed(0)
    path = str(tmp_path / "backbone.pt")
    torch.jit.script(TinyBackbone()).save(path)
    return str(tmp_path / "cub"), path


EXTRACT = dict(image_size=SIDE, batch_size=3, shard_size=4, num_workers=0, progress=False)


def test_extract_matches_backbone_and_resumes(tmp_path, cub_and_backbone, monkeypatch):
    cub, backbone = cub_and_backbone
    full = extract(cub, str(tmp_path / "full"), backbone, **EXTRACT)
    cache = FeatureCache(full)
    rec = read_cub(cub)
    images = torch.stack([ImageFolderDataset(rec.image_paths, SIDE)[i] for i in range(N_IMAGES)])
    with torch.inference_mode():
        expected = torch.jit.load(backbone)(images).numpy()
    got = cache.read(np.arange(N_IMAGES)).astype(np.float32)
    assert got.shape == (N_IMAGES, 6, 4, 4) and cache.dtype == np.float16
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(cache.labels, rec.labels)
    m = read_manifest(full)
    assert m["config"]["backbone"] == backbone and m["config"]["image_size"] == SIDE
    assert m["config"]["preprocessing"]["mean"] and len(m["shards"]) == 3 and m["complete"]

    # Interrupt after the first shard: the cache is refused until the same command completes it.
    calls = []
    real = CacheWriter.write_shard

    def crash_on_second(self, i, features, view=0):
        calls.append(i)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, i, features, view)

    monkeypatch.setattr(CacheWriter, "write_shard", crash_on_second)
    part = str(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        extract(cub, part, backbone, **EXTRACT)
    with pytest.raises(CacheError, match="incomplete.*1 of 3 shards"):
        FeatureCache(part)
    monkeypatch.setattr(CacheWriter, "write_shard", lambda self, i, f, v=0: (calls.append(i), real(self, i, f, v)))
    calls.clear()
    extract(cub, part, backbone, **EXTRACT)
    assert calls == [1, 2]                                   # only the missing shards were computed
    np.testing.assert_array_equal(FeatureCache(part).read(np.arange(N_IMAGES)), cache.read(np.arange(N_IMAGES)))
    assert not [f for f in os.listdir(part) if ".tmp" in f]
    calls.clear()
    extract(cub, part, backbone, **EXTRACT)                  # a finished cache is left alone
    assert calls == []


def test_cache_refuses_mismatch_and_corruption(tmp_path, cub_and_backbone):
    cub, backbone = cub_and_backbone
    out = extract(cub, str(tmp_path / "c"), backbone, **EXTRACT)
    with pytest.raises(CacheError, match="different cache.*image_size"):
        extract(cub, out, backbone, **{**EXTRACT, "image_size": 2 * SIDE})
    with pytest.raises(CacheError, match="different cache.*split"):
        extract(cub, out, backbone, **{**EXTRACT, "split": "train"})
    shard = os.path.join(out, "features-00001.npy")
    data = bytearray(open(shard, "rb").read())
    data[-3] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(CacheError, match="features-00001.npy fails its sha256"):
        FeatureCache(out)
    open(shard, "wb").write(bytes(data[:-40]))
    with pytest.raises(CacheError, match="features-00001.npy"):
        FeatureCache(out, verify="size")
    extract(cub, out, backbone, **EXTRACT)                   # rerunning rewrites the bad shard
    FeatureCache(out)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        FeatureCache(out)


def test_extract_split_and_bad_backbone(tmp_path, cub_and_backbone):
    cub, backbone = cub_and_backbone
    train = FeatureCache(extract(cub, str(tmp_path / "t"), backbone, split="train", **EXTRACT))
    assert len(train) == int(read_cub(cub).is_train.sum()) and train.is_train.all()
    flat = str(tmp_path / "flat.pt")
    torch.jit.script(torch.nn.Flatten()).save(flat)
    with pytest.raises(ValueError, match="expected a feature map"):
        extract(cub, str(tmp_path / "f"), flat, **EXTRACT)
    with pytest.raises(ValueError, match="neither a file"):
        extract(cub, str(tmp_path / "g"), "no_such_backbone", **EXTRACT)


TINY = dict(num_classes=5, images_per_class=8, num_attributes=12, dim=32, grid=7, num_locations=4,
            test_fraction=0.25, classes_per_genus=1, shard_size=16, progress=False)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return synthesize(str(tmp_path_factory.mktemp("synth") / "cache"), **TINY)


def killed_before_shard_1(monkeypatch, run):
    """Runs ``run()`` with the cache writer killed as it is about to write shard 1 (a simulated kill:
    ``KeyboardInterrupt``, asserted), then restores the writer."""
    real = CacheWriter.write_shard

    def crash_on_shard_1(self, i, features, view=0):
        if i == 1:
            raise KeyboardInterrupt("simulated kill")
        return real(self, i, features, view)

    monkeypatch.setattr(CacheWriter, "write_shard", crash_on_shard_1)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(CacheWriter, "write_shard", real)


def test_synth_deterministic_and_resumable(tmp_path, tiny_cache, monkeypatch):
    cache = FeatureCache(tiny_cache)
    assert cache.feature_shape == (32, 7, 7) and len(cache) == 40 and len(cache.attribute_names) == 12
    assert cache.is_train.sum() == 30 and np.bincount(cache.labels).tolist() == [8] * 5
    again = str(tmp_path / "again")
    os.makedirs(again)
    killed_before_shard_1(monkeypatch, lambda: synthesize(again, **TINY))
    synthesize(again, **TINY)
    np.testing.assert_array_equal(FeatureCache(again).read(range(40)), cache.read(range(40)))
    with pytest.raises(CacheError, match="seed"):
        synthesize(again, **{**TINY, "seed": 1})


def test_loader_reads_batches_from_the_cache(tiny_cache):
    cache = FeatureCache(tiny_cache)
    targets = np.random.default_rng(0).random((len(cache), 12)).astype(np.float32)
    rows = np.arange(3, 37)
    loader = make_loader(cache, rows, targets, batch_size=8, shuffle=True, seed=5, num_workers=2)
    seen = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        epoch_rows = []
        for batch in loader:
            idx = batch["index"].numpy()
            np.testing.assert_array_equal(batch["x"].numpy(), cache.read(idx))
            np.testing.assert_array_equal(batch["labels"].numpy(), cache.labels[idx])
            np.testing.assert_array_equal(batch["attr_target"].numpy(), targets[idx])
            assert batch["x"].dtype == torch.float16
            epoch_rows.extend(idx.tolist())
        assert sorted(epoch_rows) == rows.tolist()          # each row once, the tail batch kept
        seen.append(epoch_rows)
    assert seen[0] != seen[1]                               # reshuffled per epoch
    preload = FeatureCache(tiny_cache, preload=True)
    assert not isinstance(preload._shards()[0], np.memmap)
    np.testing.assert_array_equal(preload.read([39, 0, 17]), cache.read([39, 0, 17]))
    with pytest.raises(IndexError, match="indices must lie in"):
        cache.read([40])


def test_batch_plan_shards_global_batches_over_processes():
    rows = np.arange(50)
    one = list(BatchPlan(rows, 8, shuffle=True, seed=3, drop_last=True))
    two = [list(BatchPlan(rows, 8, shuffle=True, seed=3, rank=r, world=2, drop_last=True)) for r in range(2)]
    assert len(one) == 6 and all(len(b) == 8 for b in one)
    for i, batch in enumerate(one):
        assert two[0][i] + two[1][i] == batch
    ev = [list(BatchPlan(rows, 8, shuffle=False, rank=r, world=2)) for r in range(2)]
    assert sorted(sum(ev[0] + ev[1], [])) == rows.tolist()
    with pytest.raises(ValueError, match="multiple of the world size"):
        BatchPlan(rows, 7, shuffle=True, world=2)


def test_backbone_from_factory_and_missing_torchvision(tmp_path, cub_and_backbone, monkeypatch):
    cub, _ = cub_and_backbone
    (tmp_path / "tiny_backbone_mod.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(1)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 5, 8, stride=8), torch.nn.ReLU())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cache = FeatureCache(extract(cub, str(tmp_path / "f"), "tiny_backbone_mod:make", **EXTRACT))
    assert cache.feature_shape == (5, 2, 2)
    assert read_manifest(str(tmp_path / "f"))["config"]["backbone"] == "tiny_backbone_mod:make"
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs torchvision"):
            extract(cub, str(tmp_path / "tv"), "torchvision:resnet50", **EXTRACT)
    else:   # random weights: nothing is downloaded; cut before pooling
        with torch.inference_mode():
            assert load_backbone("torchvision:resnet18")(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 2, 2)


def test_extracted_cub_cache_trains(tmp_path, cub_and_backbone):
    """CUB tree -> extract -> train: names, calibrated targets and splits flow through."""
    from c2f.app import TrainConfig, train
    cub, backbone = cub_and_backbone
    cache = extract(cub, str(tmp_path / "c"), backbone, **EXTRACT)
    result = train(TrainConfig(features=cache, run_dir=str(tmp_path / "run"), epochs=1, batch_size=2,
                               num_workers=0, progress=False, plots=False, head="reference",
                               attr_target="calibrated"))
    assert result["test"]["n"] == int((~read_cub(cub).is_train).sum()) and result["num_classes"] == N_CLASSES


def test_split_flag_other_than_0_or_1_names_file_and_line(tmp_path):
    write_cub(tmp_path)
    path = tmp_path / "train_test_split.txt"
    lines = path.read_text().splitlines()
    lines[3] = "4 9"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CUBFormatError,
                       match=r"train_test_split.txt:4: is_training_image flag must be one of 0, 1, got 9"):
        read_cub(str(tmp_path))


def test_every_bad_image_is_reported_before_anything_is_written(tmp_path, cub_and_backbone):
    cub, backbone = cub_and_backbone
    rec = read_cub(cub)
    os.remove(rec.image_paths[1])
    open(rec.image_paths[4], "wb").close()
    with open(rec.image_paths[7], "wb") as f:
        f.write(b"not an image at all")
    out = tmp_path / "c"
    with pytest.raises(ImageCheckError) as e:
        extract(cub, str(out), backbone, **EXTRACT)
    message = str(e.value)
    assert message.startswith("3 of 10 images listed in")
    for i, why in ((1, "missing"), (4, "empty"), (7, "not a readable image")):
        assert f"img_{i}.png ({why}" in message, message
    assert not out.exists()


@pytest.mark.parametrize("arg, value", [("image_size", 0), ("batch_size", 0), ("num_workers", -1), ("shard_size", 0),
                                        ("dtype", "bfloat16"), ("split", "val")])
def test_extract_checks_its_arguments_before_creating_anything(tmp_path, cub_and_backbone, arg, value):
    cub, backbone = cub_and_backbone
    with pytest.raises(ConfigError, match=arg):
        extract(cub, str(tmp_path / "c"), backbone, **{**EXTRACT, arg: value})
    assert not (tmp_path / "c").exists()


def test_a_backbone_replaced_under_the_same_name_is_refused(tmp_path, cub_and_backbone, monkeypatch):
    cub, backbone = cub_and_backbone
    out = str(tmp_path / "c")
    killed_before_shard_1(monkeypatch, lambda: extract(cub, out, backbone, **EXTRACT))
    recorded = read_manifest(out)["config"]
    assert recorded["backbone_sha256"] == sha256_file(backbone) and recorded["amp"] == "off"
    torch.manual_seed(1)
    torch.jit.script(TinyBackbone()).save(backbone)                  # other weights, same file name
    with pytest.raises(CacheError, match="config.backbone_sha256: cache has"):
        extract(cub, out, backbone, **EXTRACT)


def test_cache_labels_beyond_the_class_count_are_refused(tmp_path, tiny_cache):
    import shutil
    out = str(tmp_path / "c")
    shutil.copytree(tiny_cache, out)
    labels = np.load(os.path.join(out, "labels.npy"))
    labels[3] = 7
    np.save(os.path.join(out, "labels.npy"), labels)
    with pytest.raises(CacheError, match=r"labels.npy: row 3 has class 7 but the cache names 5 classes"):
        FeatureCache(out, verify="size")


def test_timm_backbone_with_its_own_preprocessing(tmp_path, cub_and_backbone, monkeypatch):
    """timm cannot be installed beside this torch: a stand-in module with timm's API is used."""
    cub, _ = cub_and_backbone
    calls = {}

    class Net(torch.nn.Module):
        num_prefix_tokens = 1

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 7, 4, stride=4)

        def forward_features(self, x):                       # ViT-like: [B, 1 + H*W, C] tokens
            t = self.proj(x).flatten(2).transpose(1, 2)
            return torch.cat([t.mean(1, keepdim=True), t], 1)

    def create_model(name, pretrained):
        calls["model"] = (name, pretrained)
        torch.manual_seed(0)
        return Net()

    def resolve_data_config(args, model):
        calls["data"] = args
        return dict(input_size=args["input_size"], interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                    std=(0.5, 0.5, 0.5), crop_pct=1.0, crop_mode="center")

    def create_transform(input_size, mean, std, is_training, **kw):
        assert not is_training
        side = input_size[-1]

        def transform(img):
            arr = np.asarray(img.resize((side, side)), dtype=np.float32) / 255.0
            return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5
        return transform

    timm = types.ModuleType("timm")
    timm.create_model, timm.__version__ = create_model, "0.0-test"
    timm.data = types.SimpleNamespace(resolve_data_config=resolve_data_config, create_transform=create_transform)
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.data", timm.data)
    weights = str(tmp_path / "w.pt")
    torch.manual_seed(3)
    torch.save(Net().state_dict(), weights)
    out = extract(cub, str(tmp_path / "t"), "timm:vit_tiny_test", weights=weights, **EXTRACT)
    assert calls["model"] == ("vit_tiny_test", False) and calls["data"] == {"input_size": (3, SIDE, SIDE)}
    m = read_manifest(out)
    assert m["feature_shape"] == [7, 4, 4]
    assert m["config"]["preprocessing"]["interpolation"] == "bicubic" and m["config"]["package_version"] == "0.0-test"
    assert m["config"]["weights_sha256"] == sha256_file(weights)
    net = Net()
    net.load_state_dict(torch.load(weights, weights_only=True))
    from PIL import Image
    img = Image.open(read_cub(cub).image_paths[2]).convert("RGB")
    x = create_transform((3, SIDE, SIDE), None, None, False)(img)[None]
    with torch.inference_mode():
        expected = net.proj(x)[0].numpy()                    # the patch tokens back on their 4 x 4 grid
    np.testing.assert_allclose(FeatureCache(out).read([2])[0].astype(np.float32), expected, rtol=1e-3, atol=1e-3)


def test_predict_images_through_the_extract_backbone(tmp_path, cub_and_backbone, capsys):
    """Image files -> the cache's backbone (from its manifest) -> the head: as predicted from the cache."""
    import json

    from c2f.app import TrainConfig, train
    from c2f.app.cli import main
    cub, backbone = cub_and_backbone
    cache = extract(cub, str(tmp_path / "c"), backbone, **EXTRACT)
    run = str(tmp_path / "run")
    train(TrainConfig(features=cache, run_dir=run, epochs=1, batch_size=2, num_workers=0, progress=False,
                      plots=False))
    images = [read_cub(cub).image_paths[i] for i in (0, 3, 8)]
    assert main(["predict", run, "--images", *images, "--out", str(tmp_path / "img.json")]) == 0
    by_image = json.load(open(tmp_path / "img.json"))["predictions"]
    assert [p["sample"] for p in by_image] == images
    assert main(["predict", run, "--features", cache, "--split", "all", "--out", str(tmp_path / "all.json")]) == 0
    by_row = json.load(open(tmp_path / "all.json"))["predictions"]
    for i, p in zip((0, 3, 8), by_image, strict=True):
        assert p["pred"] == by_row[i]["pred"] and p["prob"] == pytest.approx(by_row[i]["prob"], abs=1e-3)
    capsys.readouterr()
    assert main(["predict", run, "--images", str(tmp_path / "missing.png")]) == 2
    assert "missing.png (missing)" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the manifest's schema

def _set(key, value):
    def mutate(m):
        m[key] = value
        return m
    return mutate


def _drop(key):
    def mutate(m):
        del m[key]
        return m
    return mutate


def _shard(i, **changes):
    def mutate(m):
        m["shards"][i].update(changes)
        return m
    return mutate


def _drop_from_shard(i, key):
    def mutate(m):
        del m["shards"][i][key]
        return m
    return mutate


def _meta_outside(m):
    m["meta"]["../labels"] = m["meta"]["labels"]
    return m


@pytest.mark.parametrize("mutate, expected", [
    (_drop("shards"), "shards is missing"),
    (_drop("dtype"), "dtype is missing"),
    (_drop("meta"), "meta is missing"),
    (lambda m: [m], "must hold a JSON object, got list"),
    (_set("shards", None), "shards is null, expected a list"),
    (_set("dtype", None), "dtype is null, expected one of float16, bfloat16, float32"),
    (_set("num_images", "40"), 'num_images is "40", expected an integer >= 0'),
    (_set("feature_shape", [32, 7]), "feature_shape is [32, 7], expected [C, H, W]"),
    (_set("shards", [None]), "shards lists 1 entries; 40 images in shards of 16 need 3"),
    (_drop_from_shard(0, "sha256"), "shards[0].sha256 is missing"),
    (_shard(1, count="16"), 'shards[1].count is "16", expected an integer >= 1'),
    (_shard(1, file="../other/features-00001.npy"), 'shards[1].file is "../other/features-00001.npy", expected a file '
                                                    "name in the cache directory"),
    (_meta_outside, "meta is {"),
], ids=["no-shards", "no-dtype", "no-meta", "list", "null-shards", "null-dtype", "str-count", "short-shape",
        "shard-count", "no-sha", "str-shard-count", "outside", "meta-outside"])
def test_a_manifest_that_breaks_the_schema_is_refused_in_one_line(tmp_path, tiny_cache, capsys, mutate, expected):
    """Each was a raw error (``internal error: KeyError: 'shards'``, ``'NoneType' object is not iterable``), or
    a shard read from outside the cache directory: now one line naming the field, for every command."""
    import json
    import shutil
    out = str(tmp_path / "c")
    shutil.copytree(tiny_cache, out)
    os.makedirs(tmp_path / "other")
    shutil.copy(os.path.join(out, "features-00001.npy"), tmp_path / "other")   # there to be read, were it allowed
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    with open(path, "w") as f:
        json.dump(mutate(manifest), f)
    with pytest.raises(CacheError) as e:
        FeatureCache(out)
    assert expected in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    from c2f.app.cli import main
    for argv in (["info", out], ["train", "--features", out, "--run-dir", str(tmp_path / "run"), "--no-progress"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and "internal error" not in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ one writer per cache

HOLD = """import sys, time
from c2f.app.data.cache import lock_cache
lock = lock_cache(sys.argv[1])
print("locked", flush=True)
time.sleep(300)"""


def test_a_cache_another_process_writes_is_refused(tmp_path, cub_and_backbone, capsys):
    """``c2f extract`` (and ``c2f synth``) into a cache whose lock another process holds exit 2 naming it and
    write nothing; once that process is SIGKILLed, the OS has freed the lock and extract fills the cache."""
    import signal
    import socket
    import subprocess
    import sys

    from c2f.app.cli import main
    cub, backbone = cub_and_backbone
    out = str(tmp_path / "c")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n", holder.stderr.read()
        named = f"pid {holder.pid} on host {socket.gethostname()}"
        capsys.readouterr()
        for argv in (["extract", cub, out, "--backbone", backbone, "--image-size", str(SIDE), "--num-workers", "0",
                      "--no-progress"],
                     ["synth", out, "--classes", "2", "--images-per-class", "2", "--dim", "4", "--grid", "2",
                      "--attributes", "3", "--no-progress"]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "is in use" in err and named in err, err
        assert os.listdir(out) == [".c2f-lock"]
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        holder.kill()
        holder.wait(30)
        holder.stdout.close()
        holder.stderr.close()
    extract(cub, out, backbone, **EXTRACT)
    assert len(FeatureCache(out)) == N_IMAGES
