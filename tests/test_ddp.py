"""`torchrun --nproc_per_node 2 -m c2f train` on CPU (gloo) matches one process on the same global batches."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from c2f.data import synthesize
from c2f.train import TrainConfig, train

TINY = dict(num_classes=4, images_per_class=12, num_attributes=12, dim=32, grid=7, num_locations=4,
            test_fraction=0.25, classes_per_genus=1, shard_size=16, progress=False)
ARGS = dict(epochs=2, batch_size=8, lr=1e-2, num_workers=0, seed=3)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


@pytest.mark.parametrize("stage", ["attention"])
def test_two_gloo_processes_match_one(tmp_path, stage):
    cache = synthesize(str(tmp_path / "cache"), **TINY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "c2f", "train", "--features", cache, "--run-dir", str(tmp_path / "ddp"), "--stage", stage,
           "--head", "reference", "--no-progress", "--no-plots"]
    for k, v in ARGS.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own process group: on a timeout torchrun's workers are killed with it, not left waiting in a collective.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(tmp_path), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 480 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "held-out test split" in stdout

    # One process on the same global batches: DDP's gradient average is the global-batch mean.
    train(TrainConfig(features=cache, run_dir=str(tmp_path / "one"), stage=stage, head="reference",
                      progress=False, plots=False, **ARGS))
    ddp, one = records(tmp_path / "ddp"), records(tmp_path / "one")
    assert len(ddp) == len(one) == ARGS["epochs"]
    for a, b in zip(ddp, one):
        for key in ("train_reg", "val_reg", "val_attr_map", "val_top1", "val_n"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a[key], b[key])
    wa = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
