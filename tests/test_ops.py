"""The registered ops as a user meets them: op counts, host synchronisation, double backward, gradient
ownership of the in-place mix, empty batches, shared validation, backend errors, module conventions."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import c2f
from c2f import nn as cn
from c2f import reference as ref
from c2f.part_mixup import part_mixup_, part_mixup_pool

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["torch", "triton"]
# Device-to-host reads: a synchronisation on a GPU.
SYNCING_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::equal", "aten::is_nonzero",
               "aten::masked_select", "aten::unique", "aten::_unique2")


def _profile(fn, nested=False):
    """Names of the aten ops ``fn`` dispatches, those inside c2f's custom ops included (a dispatch mode
    cannot see inside a custom op; the profiler can). ``nested``: also the ops aten kernels call
    internally (which may depend on sizes, e.g. a reduction splitting a large input)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()

    def inside_aten(e):
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False
    return [e.name for e in prof.events() if e.name.startswith("aten::") and (nested or not inside_aten(e))]


def _head_step(b, chunk_mib=1e4, heads=1, k=3, validate=False):
    torch.manual_seed(0)
    head = cn.C2FHead(64, 7, 5, heads, chunk_mib=chunk_mib)
    x = torch.randn(b, 64, 7, 7)
    perm, mask = torch.arange(b).flip(0), (torch.rand(k, b, 7) < 0.5).float()

    def step():
        with c2f.validation(validate):
            out = head(x, perm, mask)
        (out.attr_pred.square().mean() + out.logits.logsumexp(-1).mean() + out.attn.square().mean()).backward()
    return step


def _attention_step(b, heads, formulation, chunk_mib=1e4):
    torch.manual_seed(0)
    att = cn.PartAttention(64, 7, heads, formulation=formulation, chunk_mib=chunk_mib)
    x = torch.randn(b, 64, 7, 7)

    def step():
        parts, attn = att(x)
        (parts.square().mean() + attn.square().mean()).backward()
    return step


# --------------------------------------------------------------------------- op counts and syncs

@pytest.mark.parametrize("make_step", [
    pytest.param(lambda b: _head_step(b), id="head"),
    pytest.param(lambda b: _head_step(b, heads=4), id="head-h4"),
    pytest.param(lambda b: _attention_step(b, 1, "folded"), id="attention-folded"),
    pytest.param(lambda b: _attention_step(b, 4, "unfolded"), id="attention-unfolded"),
])
def test_ops_per_step_do_not_depend_on_batch(make_step):
    """One chunk (a large chunk budget): the forward + backward dispatch exactly the same ops at B=2
    and B=32 (issue 11: no per-sample Python loop)."""
    small, large = _profile(make_step(2)), _profile(make_step(32))
    assert len(small) == len(large), (len(small), len(large))
    assert sorted(small) == sorted(large)


def test_chunks_follow_the_memory_budget():
    """A small budget splits the batch into chunks: more ops, same results."""
    one, many = _profile(_head_step(8, chunk_mib=1e4)), _profile(_head_step(8, chunk_mib=0.05))
    assert len(many) > len(one)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_synchronisation_on_the_fast_path(backend):
    """With validation off (the default for GPU tensors), no op reads a value back to the host: not in
    the head, the attention, the in-place or the pooled mix, forward or backward."""
    b, p, c = 4, 7, 64
    perm, mask = torch.arange(b).flip(0), (torch.rand(3, b, p) < 0.5).float()
    parts = torch.randn(b, p, c, requires_grad=True)
    att = cn.PartAttention(c, p, 2, backend=backend)
    x = torch.randn(b, c, 7, 7)
    head_step = _head_step(b)

    def everything():
        with c2f.validation(False):
            head_step()
            a_parts, a_attn = att(x)
            mixed = part_mixup_(a_parts, perm, mask[0], backend=backend)
            pooled = part_mixup_pool(parts, perm, mask, backend=backend)
            (mixed.square().sum() + a_attn.sum() + pooled.square().sum()).backward()

    names = _profile(everything, nested=True)
    assert names, "the profiler saw no ops"
    found = sorted({n for n in names if n in SYNCING_OPS})
    assert not found, f"host synchronisation on the fast path: {found}"


def test_validation_reads_values_only_when_on():
    step = _head_step(4, validate=True)
    assert {n for n in _profile(step, nested=True)} & set(SYNCING_OPS)


# ------------------------------------------------------------------------------- double backward

def _mix_inplace(backend):
    perm, mask = torch.tensor([2, 1, 0]), torch.rand(3, 4, generator=torch.Generator().manual_seed(2))
    return lambda parts: part_mixup_(parts * 1, perm, mask, backend=backend)


def _mix_pool(backend):
    perm, mask = torch.tensor([1, 2, 0]), torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(2))
    return lambda parts: part_mixup_pool(parts, perm, mask, backend=backend)


@pytest.mark.parametrize("make", [_mix_inplace, _mix_pool], ids=["inplace", "pool"])
def test_mixup_is_twice_differentiable(make):
    parts = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(make("torch"), (parts,))
    assert torch.autograd.gradgradcheck(make("torch"), (parts,))


@pytest.mark.parametrize("make", [_mix_inplace, _mix_pool], ids=["inplace", "pool"])
def test_mixup_double_backward_triton_matches_torch(make):
    """The kernels take fp32: the second derivative through the Triton path equals the torch path's."""
    results = []
    for backend in BACKENDS:
        parts = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
        out = make(backend)(parts)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (g,) = torch.autograd.grad((out * weight).sum(), parts, create_graph=True)
        (gg,) = torch.autograd.grad((g.square() * parts).sum(), parts)
        results.append((g.detach(), gg))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("module", ["attention", "head"])
def test_attention_and_head_are_once_differentiable(module):
    """A second derivative cannot pass through the fused attention or head: a clear error, never a
    silently detached or wrong gradient."""
    x = torch.randn(2, 32, 4, 4)
    if module == "attention":
        m = cn.PartAttention(32, 3, 1)
        out, queries = m(x)[0].square().sum(), m.queries
    else:
        m = cn.C2FHead(32, 3, 4)
        out, queries = m(x).logits.square().sum(), m.attention.queries
    (g,) = torch.autograd.grad(out, queries, create_graph=True)
    assert g.requires_grad, "the first derivative must stay connected under create_graph=True"
    with pytest.raises(RuntimeError, match="once differentiable"):
        g.square().sum().backward()


# ---------------------------------------------------------------- in-place backward ownership

VIEW_KINDS = {
    "view": lambda y: y.view(y.shape[0], -1),
    "reshape": lambda y: y.reshape(y.shape[0], -1),
    "flatten": lambda y: y.flatten(1),
    "permute": lambda y: y.permute(0, 2, 1),
    "transpose-back": lambda y: y.transpose(1, 2).transpose(1, 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(VIEW_KINDS))
def test_inplace_backward_never_mixes_a_shared_gradient(backend, kind):
    """A gradient arriving through a view shares storage with the gradient another branch reads
    (``((y.view(b, -1) + w.exp()) * 3).sum()``): backward must mix a copy, and w.grad stays 3 * exp(w)."""
    b, p, c = 4, 3, 8
    perm, mask = torch.arange(b).flip(0), torch.rand(b, p)
    x = torch.randn(b, p, c, requires_grad=True)
    y = part_mixup_(x * 1, perm, mask, backend=backend)
    viewed = VIEW_KINDS[kind](y)
    w = torch.randn(viewed.shape, requires_grad=True)
    ((viewed + w.exp()) * 3).sum().backward()
    torch.testing.assert_close(w.grad, 3 * w.detach().exp())
    x_ref = x.detach().clone().requires_grad_()
    (ref.part_mixup(x_ref, perm, mask) * 3).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


# ------------------------------------------------------------------------------- empty batches

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_keeps_the_gradient_link(backend):
    """B = 0: outputs are connected to the parameters, as the reference's are, and backward runs."""
    head = cn.C2FHead(32, 3, 4, backend=backend)
    att = cn.PartAttention(32, 3, 2, backend=backend)
    x = torch.randn(0, 32, 4, 4)
    out = head(x, torch.zeros(0, dtype=torch.long), torch.zeros(2, 0, 3))
    parts, attn = att(x)
    for t in (*out, parts, attn):
        assert t.grad_fn is not None and t.shape[0 if t is not out.logits else 1] == 0
    (out.logits.sum() + out.attr_pred.sum() + parts.sum()).backward()
    assert head.attention.queries.grad is not None and att.queries.grad is not None


# ------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("bad, match", [
    (lambda m: m * 2.0, r"mask values must lie in \[0, 1\]"),
    (lambda m: m.masked_fill(m > 0.5, float("nan")), r"NaN counts as outside"),
])
def test_one_validation_for_every_module(bad, match):
    """The head, the in-place and the pooled mix reject the same masks with the same words."""
    b, p = 4, 3
    perm, mask = torch.arange(b).flip(0), torch.rand(1, b, p)
    head = cn.C2FHead(16, p, 4)
    x, parts = torch.randn(b, 16, 2, 2), torch.randn(b, p, 16)
    for call in (lambda m: head(x, perm, m), lambda m: part_mixup_(parts.clone(), perm, m[0]),
                 lambda m: part_mixup_pool(parts, perm, m)):
        with pytest.raises(ValueError, match=match):
            call(bad(mask))


def test_bool_masks_and_pairing_rules():
    b, p = 4, 3
    head = cn.C2FHead(16, p, 4)
    x, perm = torch.randn(b, 16, 2, 2), torch.arange(b).flip(0)
    mask = torch.rand(2, b, p) < 0.5
    torch.testing.assert_close(head(x, perm, mask).logits, head(x, perm, mask.float()).logits)
    with pytest.raises(ValueError, match="mask is required when perm is given"):
        head(x, perm, None)
    with pytest.raises(ValueError, match="perm is required when mask is given"):
        head(x, None, mask)
    with pytest.raises(ValueError, match="permutation"):
        head(x, torch.zeros(b, dtype=torch.long), mask)


# ---------------------------------------------------------------------------------- backends

def test_triton_backend_on_cpu_tensors_of_a_gpu_machine_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    att = cn.PartAttention(16, 3, backend="triton")
    with pytest.raises(RuntimeError, match="CPU tensors on a machine with a GPU"):
        att(torch.randn(1, 16, 2, 2))


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_triton_backend_without_the_interpreter_says_how():
    code = textwrap.dedent("""
        import torch
        from c2f import nn, functional as F
        calls = {
            "PartAttention": lambda: nn.PartAttention(16, 3, backend="triton")(torch.randn(1, 16, 2, 2)),
            "part_mixup_pool": lambda: F.part_mixup_pool(torch.randn(2, 3, 4), torch.tensor([1, 0]),
                                                         torch.rand(2, 3), backend="triton"),
            "part_mixup_": lambda: F.part_mixup_(torch.randn(2, 3, 4), torch.tensor([1, 0]), torch.rand(2, 3),
                                                 backend="triton"),
        }
        for name, call in calls.items():
            try:
                call()
            except RuntimeError as e:
                assert "TRITON_INTERPRET=1" in str(e), (name, str(e))
                print(name, "ok")
            else:
                raise AssertionError(name + " ran without the interpreter")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_clean_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("ok") == 3


# ------------------------------------------------------------------------- module conventions

def test_factory_kwargs_create_parameters_there():
    head = cn.C2FHead(32, 3, 4, 2, device="meta", dtype=torch.bfloat16)
    att = cn.PartAttention(32, 3, 2, device="meta", dtype=torch.float64)
    for m, dtype in ((head, torch.bfloat16), (att, torch.float64)):
        for name, param in m.named_parameters():
            assert param.device.type == "meta" and param.dtype == dtype, name


def test_package_attributes_load_lazily_and_kernels_do_not_collide(tmp_path):
    """``import c2f; c2f.nn`` works without importing c2f.nn first, and a package named ``kernels``
    (Hugging Face's kernel hub client has that import name) stays importable beside c2f's kernels."""
    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("MARKER = 'the other kernels package'\n")
    code = textwrap.dedent("""
        import c2f
        assert c2f.nn.C2FHead and c2f.functional.part_mixup_ and c2f.reference.C2FHead and c2f.__version__
        import kernels
        assert kernels.MARKER == "the other kernels package", kernels.__file__
        from c2f.kernels import part_mixup, plans
        assert "c2f" in part_mixup.__name__
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
