"""`torchrun --nproc_per_node 2 -m c2f train` on CPU (gloo) matches one process on the same global batches."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from c2f.app import TrainConfig, train
from c2f.app.data import synthesize

TINY = dict(num_classes=4, images_per_class=12, num_attributes=12, dim=32, grid=7, num_locations=4,
            test_fraction=0.25, classes_per_genus=1, shard_size=16, progress=False)
# amp off: --amp auto picks bf16 on a CPU with AVX512-BF16/AMX, and these comparisons are at fp32 tolerances.
ARGS = dict(epochs=2, batch_size=8, lr=1e-2, num_workers=0, seed=3, amp="off")


TIMEOUT_S = 480   # a run takes 10-20 s; a loaded 2-core machine has taken it past 240 s


def descendants(pid: int) -> list:
    """Every process below ``pid`` (torchrun starts each worker in a session of its own: killpg misses them),
    from the children of each of its threads."""
    kids = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(task) as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return kids + [d for k in kids for d in descendants(k)]


def kill_tree(proc: subprocess.Popen) -> None:
    """Stops torchrun (so it neither restarts nor reaps its workers: their PIDs stay theirs), sends SIGABRT to
    the workers (faulthandler writes their stacks to the log), then SIGKILL to all of them and torchrun."""
    try:
        os.kill(proc.pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    workers = descendants(proc.pid)
    for sig, pids in ((signal.SIGABRT, workers), (signal.SIGKILL, workers + [proc.pid])):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGABRT:
            time.sleep(2)
    proc.wait()


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def data_source(tmp_path, source: str) -> tuple:
    """``(settings, args)``: a tiny synthetic cache, or a tiny CUB tree through a TorchScript backbone (--cub)."""
    if source == "cache":
        return dict(features=synthesize(str(tmp_path / "cache"), **TINY)), ARGS
    from tests.test_data import SIDE, TinyBackbone, write_cub
    write_cub(tmp_path / "cub")
    torch.jit.script(TinyBackbone()).save(str(tmp_path / "bb.pt"))
    return (dict(cub=str(tmp_path / "cub"), backbone=str(tmp_path / "bb.pt"), image_size=SIDE),
            dict(ARGS, batch_size=2))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("stage, source", [("attention", "cache"), ("attention", "images")])
def test_two_gloo_processes_match_one(tmp_path, stage, source):
    data, args = data_source(tmp_path, source)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "c2f", "train", "--run-dir", str(tmp_path / "ddp"), "--stage", stage,
           "--head", "reference", "--no-progress", "--no-plots"]
    for k, v in {**data, **args}.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    # PYTHONFAULTHANDLER: a worker sent SIGABRT on a timeout prints every thread's stack.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    # Output to a file, not a pipe: a worker that outlives torchrun would hold a pipe open and block the read.
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path),
                                start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{log_path.read_text()[-6000:]}")
        finally:
            if proc.poll() is None:   # left by another exit (pytest-timeout, an interrupt): no orphans
                kill_tree(proc)
    stdout = log_path.read_text()
    assert proc.returncode == 0, stdout[-6000:]
    assert "held-out test split" in stdout

    # One process on the same global batches: DDP's gradient average is the global-batch mean.
    train(TrainConfig(run_dir=str(tmp_path / "one"), stage=stage, head="reference", progress=False, plots=False,
                      **data, **args))
    ddp, one = records(tmp_path / "ddp"), records(tmp_path / "one")
    assert len(ddp) == len(one) == args["epochs"]
    for a, b in zip(ddp, one, strict=True):
        for key in ("train_reg", "val_reg", "val_attr_map", "val_top1", "val_n"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a[key], b[key])
    wa = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_trainer_releases_ddps_reducer_before_the_group(tmp_path):
    """Trainer.close takes DDP's reducer (and its logger) off the wrapper before the process group is destroyed,
    even while something else still holds the wrapper, so the group's last owner is never the reducer (whose
    destructor, holding the GIL, joined gloo's threads while one of them waited for the GIL: a hang)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from c2f.app.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(4, 2))
        ddp(torch.randn(3, 4)).sum().backward()
        assert "reducer" in ddp.__dict__ and "logger" in ddp.__dict__

        class Stub:
            model = ddp

        stub = Stub()
        Trainer._release_ddp(stub)
        assert stub.model is None
        assert "reducer" not in ddp.__dict__ and "logger" not in ddp.__dict__   # held here, released all the same
        # A plain module (one process, no DDP) is left alone.
        stub.model = torch.nn.Linear(4, 2)
        Trainer._release_ddp(stub)
        assert isinstance(stub.model, torch.nn.Linear)
    finally:
        dist.destroy_process_group()
