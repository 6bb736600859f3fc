"""Per-token LayerNorm statistics in the feature cache (manifest version 3): written with the features by
``synth`` and ``extract``, given to an older cache by ``c2f cache-stats``, checked, and carried by the loader."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from c2f._math import normalised_tokens
from c2f.app.cli import main
from c2f.app.data import CacheError, FeatureCache, add_stats, extract, make_loader, rstd_from_var, synthesize
from c2f.app.data.cache import sha256_file
from c2f.app.data.manifest import STATS_VERSION
from tests.tamper import flip_bytes
from tests.test_data import EXTRACT, HOLD, TINY, TinyBackbone, killed_before_shard_1, write_cub

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

# 256 channels: enough that statistics reduced in fp32, or of the values before the cache's fp16 rounding,
# miss the float64 statistics of the stored values by far more than half an fp32 ulp.
STATS_TINY = {**TINY, "dim": 256}
HALF_ULP = 2.0 ** -24   # the largest relative error of a float64 number rounded to float32
BATCH_KEYS = {"x", "labels", "attr_target", "index"}


def float64_stats(features: np.ndarray):
    """The exact statistics, independently: ``[b, H * W]`` mean and biased variance over C, in float64."""
    x = features.astype(np.float64).reshape(len(features), features.shape[1], -1)
    return x.mean(1), x.var(1)


def assert_exact_stats(cache: FeatureCache, rows, views=None):
    mean, var = cache.read_stats(rows, views)
    true_mean, true_var = float64_stats(cache.read(rows, views))
    assert mean.dtype == var.dtype == np.float32 and mean.shape == true_mean.shape
    np.testing.assert_allclose(mean, true_mean, rtol=HALF_ULP, atol=0)
    np.testing.assert_allclose(var, true_var, rtol=HALF_ULP, atol=0)


def as_old_cache(cache: str, out: str, version: int = 1) -> str:
    """A copy of ``cache`` as a writer before version 3 left it: no statistics files, no ``stats`` section."""
    shutil.copytree(cache, out)
    for name in os.listdir(out):
        if name.startswith("stats-"):
            os.remove(os.path.join(out, name))
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    del manifest["stats"]
    manifest["version"] = version
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return out


def features_rewritten(cache: str, out: str, shard: int, local_row: int) -> str:
    """A copy of ``cache`` with one row of a feature shard set to NaN and the shard's sha256 updated in the
    manifest, its statistics left as they were: features rewritten under their statistics."""
    shutil.copytree(cache, out)
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    entry = manifest["shards"][shard]
    data = np.load(os.path.join(out, entry["file"]))
    data[local_row] = np.nan
    np.save(os.path.join(out, entry["file"]), data)
    entry["sha256"] = sha256_file(os.path.join(out, entry["file"]))
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Synthetic caches in both dtypes (the same seed: fp16 is the rounding of fp32)."""
    root = tmp_path_factory.mktemp("stats")
    return {dtype: synthesize(str(root / dtype), dtype=dtype, **STATS_TINY) for dtype in ("float16", "float32")}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_written_statistics_are_the_float64_statistics_of_the_stored_features(caches, dtype):
    cache = FeatureCache(caches[dtype])
    assert cache.has_stats and cache.manifest["version"] == STATS_VERSION
    rows = np.arange(len(cache))
    assert_exact_stats(cache, rows)
    if dtype == "float16":   # of the values as stored: the fp32 values before rounding have other statistics
        unrounded, _ = float64_stats(FeatureCache(caches["float32"]).read(rows))
        assert np.abs(cache.read_stats(rows)[0] / unrounded - 1).max() > 100 * HALF_ULP


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_statistics_reproduce_the_ops_normalisation_to_1e6(caches, dtype):
    """What the ops do with them: ``rstd_from_var(var, eps)`` and the stored mean give the ops' own fp32
    ``xhat`` and rstd (``c2f._math.normalised_tokens``) to 1e-6 relative."""
    cache, eps = FeatureCache(caches[dtype]), 1e-5
    rows = np.arange(len(cache))
    x = torch.from_numpy(cache.read(rows)).float().flatten(2)                     # [b, C, N]; fp16 -> fp32 exact
    xhat, _, rstd = normalised_tokens(x, eps, torch.float32)                       # [C, b, N], [b, N]
    mean, var = (torch.from_numpy(a) for a in cache.read_stats(rows))
    stored_rstd = rstd_from_var(var, eps)
    assert stored_rstd.dtype == torch.float32
    torch.testing.assert_close(stored_rstd, rstd, rtol=1e-6, atol=0)
    ours = (x.transpose(0, 1) - mean) * stored_rstd
    assert (ours - xhat).abs().max() <= 1e-6 * xhat.abs().max()


def test_extracted_views_have_their_own_statistics_and_the_loader_aligns_them(tmp_path):
    """``c2f extract --views 2``: each view's shards carry their statistics; shuffled batches (views drawn per
    epoch, two workers) carry the statistics of exactly the rows and views of their ``x``."""
    write_cub(tmp_path / "cub")
    torch.manual_seed(0)
    backbone = str(tmp_path / "bb.pt")
    torch.jit.script(TinyBackbone()).save(backbone)
    cache = FeatureCache(extract(str(tmp_path / "cub"), str(tmp_path / "c"), backbone, views=2, **EXTRACT))
    train = np.flatnonzero(cache.is_train)
    assert cache.has_stats and len(cache.manifest["stats"]["view_shards"]) == 1
    assert_exact_stats(cache, np.arange(len(cache)))
    assert_exact_stats(cache, train, np.ones_like(train))
    targets = np.zeros((len(cache), len(cache.attribute_names)), np.float32)
    loader = make_loader(cache, train, targets, batch_size=3, shuffle=True, seed=1, num_workers=2)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            mean, var = float64_stats(batch["x"].numpy())
            np.testing.assert_allclose(batch["x_mean"].numpy(), mean, rtol=HALF_ULP, atol=0)
            np.testing.assert_allclose(batch["x_var"].numpy(), var, rtol=HALF_ULP, atol=0)


def test_loader_batches_carry_statistics_aligned_with_their_rows(caches):
    cache = FeatureCache(caches["float16"])
    c, h, w = cache.feature_shape
    targets = np.zeros((len(cache), len(cache.attribute_names)), np.float32)
    rows = np.arange(3, 37)
    loader = make_loader(cache, rows, targets, batch_size=8, shuffle=True, seed=5, num_workers=2)
    seen = []
    for batch in loader:
        idx = batch["index"].numpy()
        assert set(batch) == BATCH_KEYS | {"x_mean", "x_var"}
        for key in ("x_mean", "x_var"):
            t = batch[key]
            assert t.dtype == torch.float32 and t.shape == (len(idx), h * w) and t.is_contiguous()
        mean, var = float64_stats(batch["x"].numpy())                            # of this batch's own x
        np.testing.assert_allclose(batch["x_mean"].numpy(), mean, rtol=HALF_ULP, atol=0)
        np.testing.assert_allclose(batch["x_var"].numpy(), var, rtol=HALF_ULP, atol=0)
        seen.extend(idx.tolist())
    assert sorted(seen) == rows.tolist() and seen != rows.tolist()             # shuffled, every row once
    plain = make_loader(cache, rows, targets, batch_size=8, shuffle=False, num_workers=0, stats=False)
    assert all(set(batch) == BATCH_KEYS for batch in plain)
    preload = FeatureCache(cache.directory, preload=True)
    for got, want in zip(preload.read_stats([39, 0, 17]), cache.read_stats([39, 0, 17]), strict=True):
        assert not isinstance(preload._stats()[0][0], np.memmap) and np.array_equal(got, want)


def test_an_old_cache_loads_unchanged_and_gains_its_statistics_with_one_command(caches, tmp_path, capsys):
    new = FeatureCache(caches["float16"])
    old_dir = as_old_cache(new.directory, str(tmp_path / "old"))
    before = {name: sha256_file(os.path.join(old_dir, name)) for name in os.listdir(old_dir)}
    old = FeatureCache(old_dir)
    assert not old.has_stats and old.read_stats([0]) is None and old.identity == new.identity
    rows = np.arange(len(old))
    np.testing.assert_array_equal(old.read(rows), new.read(rows))
    targets = np.zeros((len(old), len(old.attribute_names)), np.float32)
    assert all(set(b) == BATCH_KEYS for b in make_loader(old, rows, targets, 16, shuffle=True, num_workers=0))
    assert {name: sha256_file(os.path.join(old_dir, name)) for name in os.listdir(old_dir)} == before  # read only

    capsys.readouterr()
    assert main(["cache-stats", old_dir, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "statistics of 3 shard(s) written (0 replacing" in out, out
    gained = FeatureCache(old_dir)
    m = gained.manifest
    assert gained.has_stats and m["version"] == STATS_VERSION and gained.identity == old.identity
    for shard, entry in zip(m["shards"], m["stats"]["shards"], strict=True):
        assert entry["sha256"] == sha256_file(os.path.join(old_dir, entry["file"]))
        assert entry["features_sha256"] == shard["sha256"]
        # The very files the writer makes: statistics are a function of the stored features alone.
        assert entry["sha256"] == sha256_file(os.path.join(new.directory, entry["file"]))
    assert_exact_stats(gained, rows)
    assert add_stats(old_dir, progress=False)["written"] == 0                   # nothing left to do
    capsys.readouterr()
    assert main(["info", old_dir]) == 0
    assert json.loads(capsys.readouterr().out)["stats_done"] == 3


def test_an_old_cache_with_views_gains_the_statistics_of_every_view(tmp_path):
    write_cub(tmp_path / "cub")
    torch.manual_seed(0)
    backbone = str(tmp_path / "bb.pt")
    torch.jit.script(TinyBackbone()).save(backbone)
    made = extract(str(tmp_path / "cub"), str(tmp_path / "c"), backbone, views=3, **EXTRACT)
    old = as_old_cache(made, str(tmp_path / "old"), version=2)
    assert not FeatureCache(old).has_stats and FeatureCache(old).views == 3
    assert add_stats(old, progress=False)["written"] == 3 + 2 * 2   # 10 rows in shards of 4, 7 training images
    cache = FeatureCache(old)
    train = np.flatnonzero(cache.is_train)
    assert cache.has_stats and cache.identity == FeatureCache(made).identity
    for view in range(3):
        assert_exact_stats(cache, train, np.full_like(train, view))


def test_a_writer_resuming_an_old_partial_cache_gives_it_statistics(tmp_path, caches, monkeypatch):
    """``synth`` killed before shard 1, the partial cache turned into a version 1 one (as an older c2f left
    it), then the same command: version 3, and the statistics of the shard written before are there too."""
    part = str(tmp_path / "part")
    os.makedirs(part)
    killed_before_shard_1(monkeypatch, lambda: synthesize(part, **STATS_TINY))
    old = as_old_cache(part, str(tmp_path / "old"))
    synthesize(old, **STATS_TINY)
    cache, fresh = FeatureCache(old), FeatureCache(caches["float16"])
    assert cache.has_stats and cache.manifest["stats"] == fresh.manifest["stats"] and cache.identity == fresh.identity


def test_statistics_that_do_not_match_are_refused_in_one_line(caches, tmp_path, caplog, capsys):
    """A flipped byte in a statistics file, or features rewritten under them (their recorded feature hash no
    longer the shard's): one warning line, the cache loads without statistics (in either verify mode), batches
    carry none, and ``c2f cache-stats`` rewrites them."""
    out = str(tmp_path / "c")
    shutil.copytree(caches["float16"], out)
    flip_bytes(os.path.join(out, "stats-00001.npy"), -5)
    for verify in ("full", "size"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="c2f"):
            cache = FeatureCache(out, verify=verify)
        assert not cache.has_stats and cache.read_stats([0]) is None
        [record] = caplog.records
        message = record.getMessage()
        assert len(message.splitlines()) == 1 and "stats-00001.npy fails its sha256" in message, message
        assert "c2f cache-stats" in message
    targets = np.zeros((len(cache), len(cache.attribute_names)), np.float32)
    assert all(set(b) == BATCH_KEYS for b in make_loader(cache, [0, 20], targets, 2, shuffle=True, num_workers=0))
    capsys.readouterr()
    assert main(["cache-stats", out, "--no-progress"]) == 0
    assert "statistics of 1 shard(s) written (1 replacing" in capsys.readouterr().out
    assert_exact_stats(FeatureCache(out), np.arange(40))

    edited = features_rewritten(out, str(tmp_path / "nan"), shard=1, local_row=4)   # cache row 20
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="c2f"):
        assert not FeatureCache(edited).has_stats
    [record] = caplog.records
    assert "stats-00001.npy was computed from other features than features-00001.npy" in record.getMessage()
    assert add_stats(edited, progress=False)["dropped"] == 1
    fixed = FeatureCache(edited)
    assert fixed.has_stats and np.isnan(fixed.read_stats([20])[0]).all()


@pytest.mark.parametrize("argv, expected", [
    (["cache-stats"], "the following arguments are required: cache"),
    (["cache-stats", "{dir}", "--progress=yes"], "argument --progress/--no-progress: ignored explicit argument"),
    (["cache-stats", "{dir}", "--dtype", "float32"], "unrecognized arguments: --dtype float32"),
    (["cache-stats", "{missing}"], "manifest.json not found"),
    (["cache-stats", "{partial}"], "is incomplete: finish it with the command that made it"),
], ids=["no-dir", "progress-value", "unknown-flag", "not-a-cache", "incomplete"])
def test_cache_stats_bad_input_is_one_line_and_exit_2(caches, tmp_path, monkeypatch, capsys, argv, expected):
    partial = str(tmp_path / "partial")
    os.makedirs(partial)
    killed_before_shard_1(monkeypatch, lambda: synthesize(partial, **STATS_TINY))
    names = dict(dir=caches["float16"], missing=str(tmp_path / "none"), partial=partial)
    capsys.readouterr()
    try:
        code = main([a.format(**names) for a in argv])
    except SystemExit as e:          # argparse's own checks
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert not os.path.exists(names["missing"]) and not [f for f in os.listdir(partial) if f.startswith("stats")
                                                         and f != "stats-00000.npy"]


def test_cache_stats_refuses_a_cache_another_process_writes(caches, tmp_path, capsys):
    """A cache whose lock another process holds (its writer): ``c2f cache-stats`` exits 2 naming the holder and
    writes nothing."""
    import subprocess
    import sys
    old = as_old_cache(caches["float16"], str(tmp_path / "old"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, old], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n", holder.stderr.read()
        before = sorted(os.listdir(old))
        capsys.readouterr()
        assert main(["cache-stats", old, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is in use" in err and f"pid {holder.pid}" in err, err
        assert sorted(os.listdir(old)) == before and not FeatureCache(old).has_stats
    finally:
        holder.kill()
        holder.wait(30)
        holder.stdout.close()
        holder.stderr.close()


def test_a_manifest_whose_statistics_break_the_schema_is_refused_in_one_line(caches, tmp_path):
    out = str(tmp_path / "c")
    shutil.copytree(caches["float16"], out)
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["stats"]["shards"] = manifest["stats"]["shards"][:2]
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(CacheError, match=r"stats.shards must list 3 entries") as e:
        FeatureCache(out)
    assert len(str(e.value).splitlines()) == 1


def test_training_on_a_cache_without_statistics_says_how_to_add_them(caches, tmp_path, caplog):
    """A cache written before the statistics trains as before (computing them) and says so once, with the command."""
    from c2f.app import TrainConfig, train
    old = as_old_cache(caches["float32"], str(tmp_path / "old"))
    assert not FeatureCache(old).has_stats
    with caplog.at_level("INFO", logger="c2f"):
        train(TrainConfig(features=old, run_dir=str(tmp_path / "run"), epochs=1, batch_size=4, num_workers=0,
                          progress=False, plots=False, val_fraction=0.0, amp="off"))
    assert caplog.text.count("holds no token statistics") == 1 and f"c2f cache-stats {old}" in caplog.text
