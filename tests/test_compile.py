"""torch.compile, torch.export and CUDA graphs over c2f's registered ops (issue 14).

``torch.library.opcheck`` checks every op's schema, fake implementation, aliasing and autograd
registration; ``torch._dynamo.explain`` proves a training step traces as one graph; compiled steps
equal eager ones. Most compiles use the ``aot_eager`` backend (Dynamo + AOTAutograd, the part that
must see through c2f's ops) to stay fast on 2 cores; one case runs Inductor end to end.
"""
import typing

import pytest
import torch

import c2f
from c2f import nn as cn
from c2f.ops.c2f_head import C2FHeadOptions
from c2f.ops.part_attention import PartAttentionOptions
from c2f.part_mixup import part_mixup_, part_mixup_pool

BACKENDS = ["torch", "triton"]


def _inputs(b=4, c=32, p=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, 3, 3, generator=g)
    perm = torch.arange(b).flip(0)
    mask = (torch.rand(k, b, p, generator=g) < 0.5).float()
    return x, perm, mask


def _parameters(c=32, p=5, h=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return dict(queries=torch.randn(p, c, generator=g, dtype=dtype), k_weight=torch.randn(c, c, generator=g) / c,
                norm_weight=1 + 0.1 * torch.randn(c, generator=g), norm_bias=0.1 * torch.randn(c, generator=g))


# ------------------------------------------------------------------------------------------ opcheck

def _token_stats(x):
    """The token statistics the feature cache stores for ``x [B, C, N]``: float64 mean and biased variance over
    channels, rounded to fp32."""
    return x.double().mean(1).float(), x.double().var(1, unbiased=False).float()


def _attention_args(form, backend, requires_grad, head_reduce="mean", stats=False):
    x, _, _ = _inputs()
    w = _parameters()
    leaves = [t.requires_grad_(requires_grad) for t in (w["queries"], w["k_weight"], w["norm_weight"], w["norm_bias"])]
    options = PartAttentionOptions(num_heads=2, scale=0.25, eps=1e-5, out_dtype=torch.float32, backend=backend,
                                   chunk_mib=16.0, dot_precision="tf32", head_reduce=head_reduce)
    x = x.flatten(2)
    x_mean, x_var = _token_stats(x) if stats else (None, None)
    return (x, leaves[0], leaves[1], None, leaves[2], leaves[3], x_mean, x_var, *options)


@pytest.mark.parametrize("backend, form", [("torch", "folded"), ("torch", "unfolded"), ("triton", "folded")])
def test_opcheck_attention(backend, form):
    op = getattr(torch.ops.c2f, f"part_attention_{form}").default
    torch.library.opcheck(op, _attention_args(form, backend, requires_grad=True))
    torch.library.opcheck(op, _attention_args(form, backend, requires_grad=False))
    torch.library.opcheck(op, _attention_args(form, backend, requires_grad=True, head_reduce="max"))
    # With the token statistics given (frozen features, cached): the parameters' gradients as before.
    torch.library.opcheck(op, _attention_args(form, backend, requires_grad=True, stats=True))
    torch.library.opcheck(op, _attention_args(form, backend, requires_grad=False, stats=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_mixup(backend):
    x, perm, mask = _inputs()
    parts = torch.randn(4, 5, 32)
    torch.library.opcheck(torch.ops.c2f.part_mixup_.default, (parts.clone(), perm, mask[0], False, backend))
    torch.library.opcheck(torch.ops.c2f.part_mixup_pool.default, (parts.requires_grad_(), perm, mask, backend))
    grad = torch.randn(3, 4, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.c2f.part_mixup_pool_backward.default,
                          (grad, perm, mask, torch.float32, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_head(backend):
    x, perm, mask = _inputs()
    x = x.flatten(2)
    g = torch.randn(2, 5, 32, requires_grad=True)
    wrg, wcg = torch.randn(5, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    for head_reduce, stats in (("mean", False), ("max", False), ("mean", True)):
        options = C2FHeadOptions(eps=1e-5, backend=backend, chunk_mib=16.0, dot_precision="tf32",
                                 head_reduce=head_reduce)
        x_mean, x_var = _token_stats(x) if stats else (None, None)
        torch.library.opcheck(torch.ops.c2f.c2f_head.default,
                              (x, g, wrg, wcg, None, perm, mask, x_mean, x_var, *options))


# The schema type of each Python annotation an options field uses.
SCHEMA_TYPES = {int: "int", float: "float", str: "str", bool: "bool", torch.dtype: "ScalarType"}


@pytest.mark.parametrize("op, options", [
    ("part_attention_folded", PartAttentionOptions), ("part_attention_folded_backward", PartAttentionOptions),
    ("part_attention_unfolded", PartAttentionOptions), ("part_attention_unfolded_backward", PartAttentionOptions),
    ("c2f_head", C2FHeadOptions), ("c2f_head_backward", C2FHeadOptions)])
def test_schema_tail_is_the_options_type(op, options):
    """Each op's positional tail is its options type, field by field (name and type): the call sites and the
    autograd code build and unpack the tail with that type only, so the two must not drift apart."""
    arguments = getattr(torch.ops.c2f, op).default._schema.arguments
    tail = arguments[len(arguments) - len(options._fields):]
    assert [a.name for a in tail] == list(options._fields)
    annotations = typing.get_type_hints(options)
    assert [str(a.real_type) for a in tail] == [SCHEMA_TYPES[annotations[f]] for f in options._fields]


# ---------------------------------------------------------------------------- tracing, no breaks

def _step_fn(head, att, backend):
    def loss_fn(x, perm, mask):
        out = head(x, perm, mask)
        parts, attn = att(x)
        mixed = part_mixup_(parts * 1, perm, mask[0], backend=backend)
        pooled = part_mixup_pool(parts, perm, mask, backend=backend)
        return (out.attr_pred.square().mean() + out.logits.logsumexp(-1).mean() + out.attn.square().mean()
                + mixed.square().mean() + pooled.square().mean() + attn.square().mean())
    return loss_fn


def _modules(backend, head_reduce="mean"):
    torch.manual_seed(0)
    return (cn.C2FHead(32, 5, 4, 2, backend=backend, head_reduce=head_reduce),
            cn.PartAttention(32, 5, 2, backend=backend, head_reduce=head_reduce))


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_traces_as_one_graph(backend, monkeypatch):
    """Modules, mixup and losses: one graph, no break, even with value checks switched on (they never
    run inside a compiled region)."""
    monkeypatch.setenv("C2F_VALIDATE", "1")
    torch._dynamo.reset()
    loss_fn = _step_fn(*_modules(backend), backend)
    explained = torch._dynamo.explain(loss_fn)(*_inputs())
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_reduce", ["mean", "max"])
def test_compiled_step_equals_eager(backend, head_reduce):
    """fullgraph=True: the forward and the loss compile as one graph and AOTAutograd compiles the
    backward; values and every gradient equal eager."""
    torch._dynamo.reset()
    head, att = _modules(backend, head_reduce)
    loss_fn = _step_fn(head, att, backend)
    params = list(head.parameters()) + list(att.parameters())
    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        for p in params:
            p.grad = None
        loss = fn(*_inputs())
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in params])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


def test_inductor_compiles_the_head_step():
    """The default backend end to end (Inductor generates the glue around c2f's ops)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = cn.C2FHead(32, 5, 4, 1)
    x, perm, mask = _inputs()

    def loss_fn(x, perm, mask):
        out = head(x, perm, mask)
        return out.attr_pred.square().mean() + out.logits.logsumexp(-1).mean()
    compiled = torch.compile(loss_fn, fullgraph=True)
    eager = loss_fn(x, perm, mask)
    torch.testing.assert_close(compiled(x, perm, mask), eager)


@pytest.mark.parametrize("head_reduce", ["mean", "max"])
def test_export_inference_forward(head_reduce):
    torch.manual_seed(0)
    head = cn.C2FHead(32, 5, 4, 2, head_reduce=head_reduce).eval()
    att = cn.PartAttention(32, 5, 2, head_reduce=head_reduce).eval()
    x, _, _ = _inputs()
    for module in (head, att):
        exported = torch.export.export(module, (x,))
        names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert any("c2f." in n for n in names), names
        for got, want in zip(exported.module()(x), module(x), strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_captures_the_head_step():
    """Static shapes: the whole training step (forward, losses, backward) replays from a CUDA graph."""
    torch.manual_seed(0)
    head = cn.C2FHead(64, 7, 5, 1).cuda()
    x, perm, mask = (t.cuda() for t in _inputs(c=64, p=7))
    opt = torch.optim.SGD(head.parameters(), lr=0.0)

    def step():
        opt.zero_grad(set_to_none=False)
        out = head(x, perm, mask)
        loss = out.attr_pred.square().mean() + out.logits.logsumexp(-1).mean()
        loss.backward()
        return loss

    with c2f.validation(False):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step()
    eager = step().detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_loss, eager)
