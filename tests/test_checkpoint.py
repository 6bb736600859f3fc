"""Checkpoints: weights_only loads everywhere, pickled code refused with one line, model files that rebuild
their module alone, RNG states as plain data."""
import os
import pathlib
import random

import numpy as np
import pytest
import torch

from c2f import model_file, reference
from c2f.app import TrainConfig, checkpoint, train
from c2f.app.cli import main
from c2f.app.data import synthesize
from c2f.model_file import CheckpointError, load_model, model_args, safe_load, save_model

SMALL = dict(num_classes=4, images_per_class=8, num_attributes=6, dim=16, grid=4, num_locations=3,
             test_fraction=0.25, classes_per_genus=1, shard_size=16, progress=False)


class Armed:
    """Unpickling this touches ``marker``: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthesize(str(tmp_path_factory.mktemp("small") / "cache"), **SMALL)


def armed_checkpoint(path, marker, like=None):
    state = dict(like or {})
    state["model"] = dict(state.get("model", {}), evil=Armed(marker))
    torch.save(state, path)
    return str(path)


def test_a_pickled_callable_is_refused_everywhere_and_nothing_runs(cache, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = armed_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as e:
        safe_load(evil)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "refused to load: it holds a pickled" in message
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(evil)
    capsys.readouterr()
    for argv in (["train", "--features", cache, "--run-dir", str(tmp_path / "r"), "--init", evil, "--num-workers",
                  "0", "--batch-size", "4", "--no-progress"],
                 ["eval", evil, "--features", cache],
                 ["predict", evil, "--features", cache]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "refused to load" in err, err
    # Resume reads last.pt with weights_only=True too.
    run = tmp_path / "run"
    train(TrainConfig(features=cache, run_dir=str(run), epochs=2, stop_after=1, batch_size=4, num_workers=0,
                      progress=False, plots=False, head="reference"))
    armed_checkpoint(run / "last.pt", marker, like=safe_load(str(run / "last.pt")))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()
    # The file really is armed: an unsafe load runs it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_model_files_rebuild_each_module(tmp_path):
    from c2f import nn as c2fnn
    for module in (reference.C2FHead(dim=24, num_parts=5, num_classes=3, num_heads=3, qkv_bias=True, qk_scale=0.3),
                   c2fnn.C2FHead(dim=16, num_parts=4, num_classes=2, materialize_parts=True, backend="torch"),
                   reference.PartAttention(8, num_parts=3, eps=1e-6),
                   c2fnn.PartAttention(8, num_parts=3, num_heads=2)):
        path = str(tmp_path / f"{type(module).__name__}.pt")
        save_model(path, module, epoch=3, note=["plain", "data"])
        ckpt = safe_load(path)
        assert ckpt["format"] == "c2f-model" and ckpt["epoch"] == 3 and ckpt["model_args"] == model_args(module)
        rebuilt = load_model(path)
        assert type(rebuilt) is type(module) and model_args(rebuilt) == model_args(module)
        x = torch.randn(2, module.attention.dim if hasattr(module, "attention") else module.dim, 3, 3)
        module.eval(), rebuilt.eval()
        with torch.no_grad():
            for a, b in zip(module(x), rebuilt(x), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    args = model_args(reference.C2FHead(dim=24, num_parts=5, num_classes=3, num_heads=3, qkv_bias=True, qk_scale=0.3))
    assert args == dict(dim=24, num_parts=5, num_classes=3, num_heads=3, qkv_bias=True, qk_scale=0.3, eps=1e-5,
                        head_reduce="mean")


def test_model_file_errors_are_clear(tmp_path):
    old = str(tmp_path / "old.pt")
    torch.save(dict(model=reference.C2FHead(dim=8, num_parts=2, num_classes=2).state_dict(), epoch=1), old)
    with pytest.raises(CheckpointError, match="has no model_args"):
        load_model(old)
    path = str(tmp_path / "m.pt")
    save_model(path, reference.C2FHead(dim=8, num_parts=2, num_classes=2))
    with pytest.raises(CheckpointError, match="do not fit this C2FHead"):
        model_file.load_state(reference.C2FHead(dim=8, num_parts=3, num_classes=2), safe_load(path)["model"], path)
    ckpt = safe_load(path)
    ckpt["model_class"] = "os.system"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="not a c2f class"):
        load_model(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        safe_load(str(tmp_path / "junk.pt"))


def test_rng_state_round_trips_as_plain_data(tmp_path):
    state = checkpoint.rng_state()
    path = str(tmp_path / "rng.pt")
    torch.save(state, path)
    a = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(safe_load(path))
    b = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not os.path.exists(path + ".tmp")


def test_runs_of_earlier_versions_resume(cache, tmp_path):
    """Their last.pt holds numpy's RNG state as a pickled array: arrays are allowed, code is not."""
    run = tmp_path / "run"
    train(TrainConfig(features=cache, run_dir=str(run), epochs=2, stop_after=1, batch_size=4, num_workers=0,
                      progress=False, plots=False, head="reference"))
    state = safe_load(str(run / "last.pt"))
    state["rng"].update(numpy=np.random.get_state(), python=random.getstate())
    torch.save(state, run / "last.pt")
    assert isinstance(safe_load(str(run / "last.pt"))["rng"]["numpy"][1], np.ndarray)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert safe_load(str(run / "last.pt"))["epoch"] == 2


def test_head_rebuilds_from_its_checkpoint(tmp_path):
    """``C2FHead.from_checkpoint`` rebuilds the module from the file alone, with its constructor arguments."""
    from c2f import nn as cn
    torch.manual_seed(0)
    head = cn.C2FHead(32, 5, 4, num_heads=2, qkv_bias=True, chunk_mib=8.0)
    path = str(tmp_path / "best.pt")
    save_model(path, head, epoch=3)
    again = cn.C2FHead.from_checkpoint(path)
    assert isinstance(again, cn.C2FHead) and again.attention.num_heads == 2 and again.attention.k.bias is not None
    x = torch.randn(2, 32, 3, 3)
    for got, want in zip(again(x), head(x), strict=True):
        torch.testing.assert_close(got, want)
    assert cn.C2FHead.from_checkpoint(path, backend="torch").backend == "torch"


# ------------------------------------------------------------------------------------- checksums

def test_every_changed_byte_of_a_model_file_is_refused(tmp_path):
    """best.pt carries the sha256 of its bytes and of its content: a byte changed anywhere (a tensor, the pickle,
    the zip headers, the checksum itself) is refused with one line, not loaded as a wrong number."""
    path = str(tmp_path / "best.pt")
    save_model(path, reference.C2FHead(dim=8, num_parts=3, num_classes=2), epoch=1, metrics={"top1": 0.5})
    good = open(path, "rb").read()
    assert load_model(path) is not None and "checksum" not in safe_load(path)
    refused = 0
    for offset in range(0, len(good), 3):
        data = bytearray(good)
        data[offset] ^= 0x01
        open(path, "wb").write(bytes(data))
        with pytest.raises(CheckpointError) as e:
            safe_load(path)
        assert len(str(e.value).splitlines()) == 1
        refused += "fails its checksum" in str(e.value)
    assert refused == len(range(0, len(good), 3))
    sidecar = str(tmp_path / "best.safetensors")
    data = bytearray(open(sidecar, "rb").read())
    data[-5] ^= 0x01                                               # the tensors' bytes are at the end
    open(sidecar, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="best.safetensors: fails its checksum"):
        load_model(sidecar)


def test_files_written_before_checksums_still_load_and_say_so(tmp_path, caplog):
    path = str(tmp_path / "old.pt")
    module = reference.C2FHead(dim=8, num_parts=2, num_classes=2)
    torch.save(dict(format="c2f-model", version=1, model_class=model_file.class_path(module),
                    model_args=model_args(module), model=module.state_dict()), path)
    with caplog.at_level("WARNING", logger="c2f"):
        load_model(path)
    assert "old.pt: no checksum: written before c2f stored one; loaded unverified" in caplog.text
    caplog.clear()
    save_model(path, module)
    with caplog.at_level("WARNING", logger="c2f"):
        load_model(path)
    assert "no checksum" not in caplog.text
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


@pytest.mark.parametrize("old, cls", [("c2f.head.C2FHead", "C2FHead"),
                                      ("c2f.attention.PartAttention", "PartAttention")])
def test_model_files_naming_modules_renamed_in_0_2_still_load(tmp_path, old, cls):
    """0.1 wrote ``c2f.head.C2FHead``; the class lives in ``c2f.c2f_head`` now, and the file loads without warnings."""
    import warnings

    from c2f import nn as cn
    module = getattr(cn, cls)(dim=8, num_parts=3, **(dict(num_classes=2) if cls == "C2FHead" else {}))
    path = str(tmp_path / "old.pt")
    save_model(path, module)
    state = safe_load(path)
    state.pop("checksum", None)
    state["model_class"] = old
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        loaded = load_model(path)
    assert type(loaded) is type(module)
    for k, v in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
