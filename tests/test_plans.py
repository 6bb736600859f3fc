"""Launch plans against the targets' limits (kernels/plans.py and the ops' kernels/plans_<op>.py,
kernels/targets.py).

- Tiles and stages shrink as the per-block shared-memory limit shrinks (227 -> 99 -> 64 KiB), the plan's
  own bound stays within the limit, and the kernels stay exact under the interpreter with those tiles.
- Where nothing fits, a clear error before anything is launched.
- The device query reads the limits from ``torch.cuda.get_device_properties`` (CUDA and ROCm), once per
  device; ``backend="auto"`` picks the Triton kernels on ROCm (device type "cuda").
- The dot precision each target compiles.
"""
import dataclasses
import types

import pytest
import torch

from c2f import _backend
from c2f.kernels import launch, plans, targets
from c2f.kernels import part_mixup as pm
from c2f.kernels import plans_part_attention as attention_plans
from c2f.kernels import plans_part_mixup as mixup_plans
from c2f.kernels.launch import plan_for
from tests.test_part_attention_contract import FP32_TOL, make_inputs, run_and_compare

KIB = 1024
SM90 = targets.TARGETS["sm_90"]
LIMITS_KIB = (227, 99, 64)


def with_limit(kib: int) -> targets.Target:
    """sm_90 with a smaller per-block limit: only the limit differs, so only it can shrink the tiles."""
    return dataclasses.replace(SM90, name=f"sm_90@{kib}KiB", smem_per_block=kib * KIB)


def production_plans(target) -> dict:
    """Every kernel's plan at the production shape (B=16, C=2048, N=196, P=312, one head, K=4 views)."""
    b, c, n, p, h, k = 16, 2048, 196, 312, 1, 4
    dt = torch.float32
    return dict(
        scores=attention_plans.attention_scores(b, c, n, p, h, dt, target),
        parts=attention_plans.attention_parts(b, c, n, p, h, dt, target),
        dp=attention_plans.attention_dp(b, c, n, p, h, dt, target),
        dg=attention_plans.attention_dg(b, c, n, p, h, dt, target),
        dxhat=attention_plans.attention_dxhat(b, c, n, p, h, dt, target),
        pool_fwd=mixup_plans.mixup_pool_fwd(k, b, p, c, dt, target),
        pool_bwd=mixup_plans.mixup_pool_bwd(k, b, p, c, dt, target))


def tile_volume(plan) -> int:
    """Elements of shared-memory staging a plan asks for: the product of its block sizes times its stages."""
    volume = plan.num_stages
    for name, value in plan.constexprs.items():
        if name.startswith("BLOCK_"):
            volume *= value
    return volume


def test_tiles_shrink_as_the_limit_shrinks():
    previous = None
    for kib in LIMITS_KIB:
        target = with_limit(kib)
        current = production_plans(target)
        for name, plan in current.items():
            assert plan.smem_bound <= target.smem_per_block, (kib, name, plan)
        if previous is not None:
            for name, plan in current.items():
                assert tile_volume(plan) <= tile_volume(previous[name]), (kib, name, plan, previous[name])
                assert plan.smem_bound <= previous[name].smem_bound, (kib, name)
            assert sum(map(tile_volume, current.values())) < sum(map(tile_volume, previous.values())), kib
        previous = current
    # The table's own entries of those sizes plan alike.
    for name, kib in (("sm_90", 227), ("sm_86", 99), ("gfx942", 64)):
        assert plans.gemm_tiles(targets.TARGETS[name]) == plans.gemm_tiles(with_limit(kib)), name


def test_every_target_has_a_plan_within_its_limit():
    for target in targets.TARGETS.values():
        for name, plan in production_plans(target).items():
            assert plan.smem_bound <= target.smem_per_block, (target.name, name)


@pytest.mark.cuda
@pytest.mark.parametrize("kib", LIMITS_KIB)
def test_parity_with_the_smaller_tiles(kib, device):
    """The GPU tiles of each limit run under the interpreter (on a GPU: compiled) and stay exact: several
    blocks or loop trips per GEMM (C=96, N=40, P=40, h=2 against 32..128-wide tiles), partial edge tiles."""
    with plan_for(with_limit(kib)):
        run_and_compare(("triton", 16.0), *make_inputs(2, 96, 40, 40, 2, device=device), 2, *FP32_TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("kib", LIMITS_KIB)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_parity_with_the_smaller_tiles(kib, dtype, device):
    from c2f.torch_ops import part_mixup as torch_pm
    b, p, c, k = 3, 21, 80, 5
    parts = torch.randn(b, p, c).to(dtype).to(device)
    perm, mask = torch.tensor([2, 0, 1], device=device), torch.rand(k, b, p, device=device)
    grad = torch.randn(k, b, c).to(dtype).to(device)
    with plan_for(with_limit(kib)):
        out, dparts = pm.part_mixup_pool_fwd(parts, perm, mask), pm.part_mixup_pool_bwd(grad, perm, mask, dtype)
    want = torch_pm.part_mixup_pool_fwd(parts, perm, mask)
    want_d = torch_pm.part_mixup_pool_bwd(grad, perm, mask, dtype)
    # Both compute in fp32 (exact 16-bit operands, fp32 masks) and round once: at most one 16-bit ulp apart
    # (the interpreter's bf16 stores truncate), fp32 to accumulation order.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 ** -12, rtol=2 ** -7)
    torch.testing.assert_close(out.float(), want.float(), **tol)
    torch.testing.assert_close(dparts.float(), want_d.float(), **tol)


def test_nothing_fits_raises_before_launch():
    from c2f.kernels import part_attention as pa
    tiny = with_limit(16)
    x, g, gamma, beta, _, _ = make_inputs(1, 64, 16, 7, 1)
    with plan_for(tiny), pytest.raises(plans.PlanError, match=r"sm_90@16KiB.*16 KiB of shared memory per block"):
        pa.folded_fwd(x, g, gamma, beta, 1e-5, x.dtype, 16.0)
    with plan_for(tiny), pytest.raises(plans.PlanError, match=r"x shape \(1, 64, 16\).*float32"):
        pa.folded_fwd(x, g, gamma, beta, 1e-5, x.dtype, 16.0)
    # The pooled mix shrinks its channel block down to 16 first: only a few KiB are too few. Its error names
    # the op and the parts like the attention's.
    parts, perm, mask = torch.randn(2, 7, 64), torch.tensor([1, 0]), torch.rand(4, 2, 7)
    with plan_for(with_limit(4)), pytest.raises(plans.PlanError, match="pooled-mixup tiles fit sm_90@4KiB"):
        pm.part_mixup_pool_fwd(parts, perm, mask)
    with plan_for(with_limit(4)), pytest.raises(plans.PlanError, match=r"part mixup on grad shape \(4, 2, 64\)"):
        pm.part_mixup_pool_bwd(torch.randn(4, 2, 64), perm, mask, torch.float32)
    with plan_for(tiny):
        assert pm.part_mixup_pool_fwd(parts, perm, mask).shape == (4, 2, 64)


def test_dot_precision_per_target():
    t = targets.TARGETS
    assert plans.dot_constexpr(t["sm_80"], "tf32") == "tf32"
    assert plans.dot_constexpr(t["gfx942"], "tf32") == "tf32"          # XF32
    assert plans.dot_constexpr(t["gfx90a"], "tf32") == "ieee"          # no TF32 in Triton's HIP backend
    assert plans.dot_constexpr(t["gfx950"], "tf32") == "ieee"
    assert plans.dot_constexpr(t["sm_90"], "fp16") == "fp16"
    assert plans.dot_constexpr(targets.INTERPRETER, "bf16") == "bf16_rounded"
    with pytest.raises(ValueError, match="dot_precision"):
        plans.dot_constexpr(t["sm_90"], "fp8")
    # The pooled mix: fp32 parts at an fp32-accurate precision, 16-bit parts split the mask.
    assert mixup_plans.mixup_pool_fwd(4, 2, 7, 64, torch.float32, t["sm_90"]).constexprs["PRECISION"] == "tf32x3"
    assert mixup_plans.mixup_pool_fwd(4, 2, 7, 64, torch.float32, t["gfx942"]).constexprs["PRECISION"] == "ieee"
    assert mixup_plans.mixup_pool_fwd(4, 2, 7, 64, torch.float16, t["gfx942"]).constexprs["SPLIT"]


# ------------------------------------------------------------------------------------------ device query

def _props(**kw):
    return types.SimpleNamespace(**kw)


@pytest.fixture
def fake_devices(monkeypatch):
    """``torch.cuda.get_device_properties`` answering from a dict, counting the calls; a clean cache."""
    calls, devices = [], {}

    def get_device_properties(index):
        calls.append(index)
        return devices[index]

    monkeypatch.setattr(torch.cuda, "get_device_properties", get_device_properties)
    targets.device_target.cache_clear()
    yield devices, calls
    targets.device_target.cache_clear()


def test_device_target_reads_cuda_properties_once_per_device(fake_devices, monkeypatch):
    devices, calls = fake_devices
    monkeypatch.setattr(torch.version, "hip", None)
    devices[0] = _props(name="NVIDIA GeForce RTX 4090", major=8, minor=9, shared_memory_per_block_optin=101376,
                        shared_memory_per_multiprocessor=102400, regs_per_multiprocessor=65536, warp_size=32)
    devices[1] = _props(name="A future part", major=8, minor=7, shared_memory_per_block_optin=48 * KIB,
                        shared_memory_per_multiprocessor=64 * KIB, regs_per_multiprocessor=32768, warp_size=32)
    t0 = targets.device_target(0)
    assert (t0.name, t0.backend, t0.arch, t0.warp_size) == ("sm_89", "cuda", 89, 32)
    assert (t0.smem_per_block, t0.smem_per_sm, t0.regs_per_sm, t0.devices) == (101376, 102400, 65536,
                                                                                "NVIDIA GeForce RTX 4090")
    assert targets.device_target(0) is t0 and calls == [0]                 # cached per device
    t1 = targets.device_target(1)
    assert calls == [0, 1] and (t1.name, t1.smem_per_block, t1.regs_per_sm) == ("sm_87", 48 * KIB, 32768)
    # Not in the table: the same rule sizes its tiles from its own limit.
    assert plans.gemm_tiles(t1) == plans.GEMM_LADDER[-1]
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    assert targets.current(torch.device("cuda", 1)) is t1


def test_device_target_on_rocm(fake_devices, monkeypatch):
    devices, calls = fake_devices
    monkeypatch.setattr(torch.version, "hip", "6.3.42131")
    devices[0] = _props(name="AMD Instinct MI300X", gcnArchName="gfx942:sramecc+:xnack-", major=9, minor=4,
                        shared_memory_per_block_optin=64 * KIB, shared_memory_per_multiprocessor=64 * KIB,
                        regs_per_multiprocessor=65536, warp_size=64)
    devices[1] = _props(name="AMD Instinct MI355X", gcnArchName="gfx950:sramecc+:xnack-", major=9, minor=5,
                        shared_memory_per_block_optin=160 * KIB, shared_memory_per_multiprocessor=160 * KIB,
                        regs_per_multiprocessor=65536, warp_size=64)
    t0, t1 = targets.device_target(0), targets.device_target(1)
    assert (t0.name, t0.backend, t0.arch, t0.warp_size, t0.smem_per_block) == ("gfx942", "hip", "gfx942", 64, 64 * KIB)
    assert t0.regs_per_sm == targets.TARGETS["gfx942"].regs_per_sm        # the table's unit, not the device's
    assert (t1.name, t1.smem_per_block) == ("gfx950", 160 * KIB)
    assert targets.device_target(0) is t0 and calls == [0, 1]
    assert t0.gpu_target().backend == "hip" and t0.gpu_target().warp_size == 64
    assert plans.dot_constexpr(t0, "tf32") == "tf32" and plans.dot_constexpr(t1, "tf32") == "ieee"
    assert plans.gemm_tiles(t0) == plans.gemm_tiles(targets.TARGETS["gfx942"])


def test_auto_backend_picks_triton_on_rocm(monkeypatch):
    """ROCm builds of torch call their devices "cuda": auto selects the Triton kernels there too."""
    monkeypatch.setattr(torch.version, "hip", "6.3.42131")
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    assert _backend.resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert _backend.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_the_public_dot_precisions_are_the_kernels():
    """c2f.part_attention keeps its own copy of the list (no kernels import on the torch path): it must not drift."""
    from c2f.part_attention import DOT_PRECISIONS as public
    assert public == plans.DOT_PRECISIONS


# ------------------------------------------------------------------------------ short rows
SHORT_ROW_N = (1, 16, 49, 196, 255, 256)
LONG_ROW_N = (257, 324, 576, 1024)


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_short_rows_flip_past_256_tokens_on_every_target(name):
    """Every target in the table keeps whole rows of up to 256 tokens on chip, the tiled kernels past that;
    the short-row plans stay within the target's limit at every short N and shape of the inspect grid."""
    target = targets.TARGETS[name]
    assert [attention_plans.short_rows(n, target) for n in SHORT_ROW_N + LONG_ROW_N] == \
        [True] * len(SHORT_ROW_N) + [False] * len(LONG_ROW_N)
    for n in SHORT_ROW_N:
        for c, h in ((2048, 1), (1536, 3), (2048, 16), (200, 1)):
            for plan in (attention_plans.attention_fwd_rows(16, c, n, 312, h, torch.float32, target),
                         attention_plans.attention_bwd_rows(16, c, n, 312, h, torch.float32, target)):
                assert plan.smem_bound <= target.smem_per_block, (name, n, c, h, plan)
                assert plan.constexprs["BLOCK_N"] >= n
    with pytest.raises(plans.PlanError, match="whole rows of at most 256 tokens"):
        attention_plans.attention_fwd_rows(16, 2048, 257, 312, 1, torch.float32, target)


def test_short_rows_flip_earlier_on_smaller_targets():
    """Below the table's limits the flip comes at fewer tokens (the rows' tiles no longer fit), and where not
    even the tiled backward's GEMMs fit, nowhere (the tiled path then raises PlanError)."""
    flips = {}
    for kib in (227, 99, 64, 48, 40, 32, 16):
        short = [n for n in (16, 32, 64, 128, 256) if attention_plans.short_rows(n, with_limit(kib))]
        assert short == sorted(short) and short == [n for n in (16, 32, 64, 128, 256) if n <= max(short, default=0)]
        flips[kib] = max(short, default=0)
    assert flips[227] == flips[99] == flips[64] == 256
    assert list(flips.values()) == sorted(flips.values(), reverse=True)
    assert 0 < flips[40] < 256 and flips[16] == 0, flips


def test_short_row_tiles_shrink_with_the_limit():
    """Stages, then the channel chunk, shrink with the per-block limit; rows per block come from registers."""
    got = {kib: attention_plans.attention_fwd_rows(16, 2048, 196, 312, 1, torch.float32, with_limit(kib))
           for kib in LIMITS_KIB}
    assert [(p.num_stages, p.constexprs["BLOCK_K"]) for p in got.values()] == [(2, 32), (1, 32), (1, 16)]
    assert {p.constexprs["BLOCK_Q"] for p in got.values()} == {attention_plans.ROWS_FWD_BLOCK_Q}
    bwd = attention_plans.attention_bwd_rows(16, 2048, 196, 312, 1, torch.float32, targets.TARGETS["gfx950"])
    assert bwd.num_stages == attention_plans.ROWS_BWD_STAGES_HIP
    assert bwd.constexprs["BLOCK_Q"] == attention_plans.ROWS_BWD_BLOCK_Q
