"""The CPU live-tensor tracker against known allocations and against torch's own MemTracker; custom ops
seen from inside; the op counter; the interpreter's byte counts."""
import pytest
import torch
from torch import nn

from bench.memtrack import (
    CustomOpExpander,
    LiveTensorTracker,
    OpCounter,
    count_flops,
    device_used_bytes,
    measure_step,
    peak_live_bytes,
    saved_tensor_bytes,
)


def test_single_allocation_is_its_bytes():
    with LiveTensorTracker() as tracker:
        a = torch.empty(1000, 250)
    assert tracker.peak_bytes == 1000 * 250 * 4
    assert tracker.current_bytes == 1000 * 250 * 4
    del a
    assert tracker.current_bytes == 0


def test_known_chain_of_ops():
    x = torch.randn(256, 256)  # existed before: not counted
    nbytes = x.numel() * 4

    def chain():
        y = x * 2          # +1 buffer
        z = y + 1          # +1, y still alive: 2
        del y              # -1
        w = z.t()          # a view: +0
        v = w.contiguous() # +1: 2 alive (z, v)
        del z, w, v

    with LiveTensorTracker() as tracker:
        chain()
    assert tracker.peak_bytes == 2 * nbytes
    assert tracker.current_bytes == 0


def test_inplace_and_views_of_inputs_are_free():
    x = torch.randn(128, 64)

    def fn():
        x.mul_(2)
        x.view(64, 128).add_(1)
        return x[:10]

    assert peak_live_bytes(fn, "cpu") == 0


def test_gradients_are_counted():
    w = torch.randn(512, 512, requires_grad=True)
    x = torch.randn(8, 512)
    peak = peak_live_bytes(lambda: (x @ w).sum().backward(), "cpu")
    assert w.grad is not None
    assert peak >= w.numel() * 4  # the gradient is allocated inside


def _mlp_step(model, x):
    model(x).square().mean().backward()


@pytest.mark.parametrize("batch", [16, 64])
def test_agrees_with_torch_mem_tracker(batch):
    from torch.distributed._tools.mem_tracker import MemTracker

    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 256))
    x = torch.randn(batch, 512)
    ours = peak_live_bytes(lambda: _mlp_step(model, x), "cpu")

    model.zero_grad(set_to_none=True)
    theirs = MemTracker()
    theirs.track_external(model, x)
    with theirs:
        _mlp_step(model, x)
    peak = theirs.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    existing = sum(p.numel() * p.element_size() for p in model.parameters()) + x.numel() * x.element_size()
    # MemTracker counts parameters and inputs too; the tracker counts only what the step allocated.
    assert ours == peak - existing, (ours, peak, existing)


def test_saved_tensor_bytes_counts_storages_once():
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(16, 64)
    # x @ w saves x only (x needs no gradient, so w is not needed); tanh saves its output [16, 32].
    saved = saved_tensor_bytes(lambda: torch.tanh(x @ w).view(-1))
    assert saved == (16 * 64 + 16 * 32) * 4
    x.requires_grad_()
    assert saved_tensor_bytes(lambda: torch.tanh(x @ w)) == (16 * 64 + 64 * 32 + 16 * 32) * 4


def test_saved_tensor_bytes_dedups_views():
    w = torch.randn(64, 64, requires_grad=True)
    # mul saves both operands: w and a view of w are one storage.
    assert saved_tensor_bytes(lambda: w * w.t()) == 64 * 64 * 4


def test_count_flops_matmul():
    a, b = torch.randn(32, 64), torch.randn(64, 16)
    assert count_flops(lambda: a @ b) == 2 * 32 * 64 * 16


# ---- custom ops (torch.ops.c2f.* are torch.library custom ops): what happens inside them counts ----

N_TEMP = 256


@torch.library.custom_op("c2f_bench_test::gram_sum", mutates_args=())
def _gram_sum(x: torch.Tensor, backend: str) -> torch.Tensor:
    """x @ x.T summed over rows: one [N, N] temporary (and the matmul's FLOPs) that only exist inside."""
    return (x @ x.t()).sum(0)


@_gram_sum.register_fake
def _(x, backend):
    return x.new_empty(x.shape[0])


def test_custom_op_is_opaque_without_the_expander():
    """Why the expander exists: a plain dispatch mode sees the custom op, not the ops inside it."""
    x = torch.randn(N_TEMP, 64)
    counter = OpCounter()
    with counter:
        torch.ops.c2f_bench_test.gram_sum(x, "torch")
    assert list(counter.by_op) == ["c2f_bench_test.gram_sum.default"]


def test_tracker_flops_and_ops_see_inside_custom_ops():
    x = torch.randn(N_TEMP, 64)
    temp, out = N_TEMP * N_TEMP * 4, N_TEMP * 4
    assert peak_live_bytes(lambda: torch.ops.c2f_bench_test.gram_sum(x, "torch"), "cpu") == temp + out
    assert count_flops(lambda: torch.ops.c2f_bench_test.gram_sum(x, "torch")) == 2 * N_TEMP * 64 * N_TEMP
    m = measure_step(lambda: torch.ops.c2f_bench_test.gram_sum(x, "torch"))
    assert m["peak_bytes"] == temp + out and m["custom_ops"] == 1 and m["flops_complete"]
    assert m["ops"] >= 2 and m["ops"] == m["ops_nonview"] + 1  # mm, sum, and the view x.t()


def test_expander_flags_triton_backed_custom_ops():
    x = torch.randn(8, 4)
    expander = CustomOpExpander()
    with expander:
        torch.ops.c2f_bench_test.gram_sum(x, "triton")  # the torch implementation runs; the label is what counts
    assert expander.triton == {"c2f_bench_test::gram_sum": 1}
    assert measure_step(lambda: torch.ops.c2f_bench_test.gram_sum(x, "triton"))["flops_complete"] is False


def test_flops_of_gemms_torch_does_not_count():
    """In-place and out= GEMMs and matmul as they reach a mode below autograd (inside a custom op)."""
    a, b, c = torch.randn(8, 16), torch.randn(16, 4), torch.zeros(8, 4)
    x, y = torch.randn(3, 8, 16), torch.randn(3, 16, 4)

    def inside():
        with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
            c.addmm_(a, b)                       # 2*8*16*4
            torch.matmul(a, b, out=torch.empty(8, 4))
            torch.matmul(a, b)
            torch.mv(a, torch.randn(16))         # 2*8*16
            torch.addbmm(c, x, y)                # 2*3*8*16*4
    assert count_flops(inside) == 3 * 2 * 8 * 16 * 4 + 2 * 8 * 16 + 2 * 3 * 8 * 16 * 4


def test_head_flops_counted_inside_equal_its_flop_formulas():
    """Two independent counts of the fused head's GEMMs: FlopCounterMode on the ops inside its custom ops
    (the bench's expander) and c2f's own FLOP formulas for the custom ops (no expander)."""
    from torch.utils.flop_counter import FlopCounterMode

    from c2f import nn as c2fnn

    model = c2fnn.C2FHead(64, 7, 5, num_heads=2)
    x, perm, mask = torch.randn(3, 64, 7, 7), torch.tensor([2, 1, 0]), (torch.rand(2, 3, 7) < 0.5).float()

    def step():
        out = model(x, perm, mask)
        (out.attr_pred.square().mean() + out.logits.logsumexp(-1).mean()).backward()

    formulas = FlopCounterMode(display=False)
    with formulas:
        step()
    assert count_flops(step) == formulas.get_total_flops()


def test_op_counter_counts_views_and_low_precision():
    x = torch.randn(16, 16)
    counter = OpCounter()
    with counter:
        y = (x + 1).t()
        y.to(torch.bfloat16)
    assert counter.total == 3 and counter.views == 1 and counter.low_precision == 1


def test_fused_head_step_memory_is_seen_inside_its_ops():
    """The fused head is one custom op forward and one backward: the tracker must agree with the
    allocator's own events (the profiler), which no dispatch mode can hide (to a few bytes: a scalar
    or two that autograd allocates outside any op)."""
    from bench.memtrack import profiler_peak_bytes
    from c2f import nn as c2fnn

    model = c2fnn.C2FHead(64, 7, 5)
    x, perm, mask = torch.randn(3, 64, 7, 7), torch.tensor([2, 1, 0]), (torch.rand(2, 3, 7) < 0.5).float()

    def step():
        out = model(x, perm, mask)
        (out.attr_pred.square().mean() + out.logits.logsumexp(-1).mean()).backward()

    m = measure_step(step)
    model.zero_grad(set_to_none=True)
    assert m["custom_ops"] == 2 and m["flops"] > 0
    assert m["peak_bytes"] == pytest.approx(profiler_peak_bytes(step), rel=0.01)


def test_device_used_bytes_is_none_without_cuda():
    if torch.cuda.is_available():
        assert device_used_bytes() is None or device_used_bytes() > 0
    else:
        assert device_used_bytes() is None


# ---- bench.bytes_moved: load/store counting under the interpreter (tests/conftest.py sets it) ----

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.bytes_moved import SECTOR_BYTES, measure_launch  # noqa: E402


@triton.jit
def _rowsum_kernel(X_ptr, W_ptr, Y_ptr, C, REPEAT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Y[b, j] = sum_c X[b, c] * W[c]; REPEAT programs per sample each re-read the whole row of X."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // REPEAT
    offs = tl.arange(0, BLOCK_C)
    ok = offs < C
    x = tl.load(X_ptr + b * C + offs, mask=ok, other=0.0)
    w = tl.load(W_ptr + offs, mask=ok, other=0.0)
    tl.store(Y_ptr + pid, tl.sum(x * w, axis=0))


def _rowsum(B, C=100, repeat=3):
    x, w, y = torch.randn(B, C), torch.randn(C), torch.empty(B * repeat)
    return lambda: _rowsum_kernel[(B * repeat,)](x, w, y, C, REPEAT=repeat, BLOCK_C=128)


def test_bytes_logical_and_compulsory():
    B, C, R = 4, 100, 3
    r = measure_launch(_rowsum(B, C, R))
    (launch,) = r["launches"]
    assert launch["programs"] == B * R
    # masked lanes (100 of 128) do not count; every program reads its row and all of W, writes 1 value
    assert r["logical_load"] == B * R * 2 * C * 4
    assert r["logical_store"] == B * R * 4
    assert r["compulsory"] == (B * C + C + B * R) * 4
    # one wave holds every program: HBM = distinct sectors, rounded up to 32 bytes per sector
    assert r["compulsory"] <= r["hbm_estimate"] <= r["compulsory"] + 8 * SECTOR_BYTES


def test_bytes_waves_and_extrapolation():
    B, C, R = 2, 96, 3  # 96 fp32 = 12 sectors per row
    # waves of 2 programs split the 3 readers of a row: each row is fetched in 2 waves
    small = measure_launch(_rowsum(B, C, R), sms=2, ctas_per_sm=1)
    assert small["launches"][0]["waves"] == 3
    # waves {0,1} {2,3} {4,5}: row 0 in the first two, row 1 in the last two, W (12 sectors) in all three
    assert small["hbm_load"] == (12 + 12) * SECTOR_BYTES + (12 + 12 + 12) * SECTOR_BYTES + (12 + 12) * SECTOR_BYTES
    # B=8 from a B=2 trace: every count scales by 4 except the shared W
    big = measure_launch(_rowsum(B, C, R), batch=B, target_batch=8, target_fn=_rowsum(8, C, R), sms=132)
    direct = measure_launch(_rowsum(8, C, R), sms=132)
    for key in ("logical_load", "logical_store", "unique_load", "unique_store", "hbm_load"):
        assert big[key] == direct[key], key
    assert big["launches"][0]["grid"] == [8 * R, 1, 1]


def test_profiler_peak_agrees_with_tracker():
    from bench.memtrack import profiler_peak_bytes

    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    x = torch.randn(32, 256)
    ours = peak_live_bytes(lambda: _mlp_step(model, x), "cpu")
    model.zero_grad(set_to_none=True)
    assert profiler_peak_bytes(lambda: _mlp_step(model, x)) == ours
