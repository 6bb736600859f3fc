"""Math shared by the torch-op implementations: compute dtype, token statistics, softmax and LayerNorm
backward, chunking by a memory budget. One definition each (docs/design.md, "The algebra")."""
from __future__ import annotations

import torch

# Default budget for the temporaries of one chunk of samples in the torch-op paths (module argument
# ``chunk_mib``). Batched GEMMs over several samples run near the machine's GEMM throughput while a
# single sample's [P, C] x [C, 196] product does not (docs/design.md, "Chunking"); the budget keeps
# the chunk's temporaries small next to the step's unavoidable tensors.
DEFAULT_CHUNK_MIB = 16.0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 whatever the storage dtype; float64 inputs (tests, gradcheck) stay float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunk_size(batch: int, per_sample_bytes: int, chunk_mib: float) -> int:
    """Samples per chunk: as many as fit ``chunk_mib`` of temporaries (at least one), spread evenly
    over the chunks the batch needs (16 samples at 14 a chunk run as 8 + 8, not 14 + 2)."""
    fits = max(1, min(batch, int(chunk_mib * 2 ** 20) // max(per_sample_bytes, 1)))
    count = -(-batch // fits) if batch else 1
    return -(-batch // count) if batch else 1


def chunks(batch: int, size: int):
    """Slices ``[s, s + size)`` covering ``range(batch)``."""
    return [slice(s, min(s + size, batch)) for s in range(0, batch, size)]


def normalised_tokens(x: torch.Tensor, eps: float, dtype: torch.dtype, mean=None, rstd=None):
    """``xhat [C, b, N]`` (channels outermost, so ``xhat.view(C, b * N)`` is one GEMM operand for the
    whole chunk), with the token ``mean, rstd [b, N]`` of ``x [b, C, N]`` (any strides).

    Two passes (mean, then the centred sum of squares): exact with a large common offset (x + 1000).
    Given ``mean`` and ``rstd`` (backward, or statistics given with x: ``given_token_stats``), only the
    normalisation runs.
    """
    xt = x.transpose(0, 1)                                               # [C, b, N], a view
    if mean is None:
        mean = xt.mean(0, dtype=dtype)
    xhat = torch.empty(xt.shape, dtype=dtype, device=x.device)
    torch.sub(xt, mean, out=xhat)
    if rstd is None:
        rstd = torch.linalg.vector_norm(xhat, dim=0).square_().div_(xhat.shape[0]).add_(eps).rsqrt_()
    return xhat.mul_(rstd), mean, rstd


def stats_given(x_mean: torch.Tensor | None, x_var: torch.Tensor | None) -> bool:
    """Whether the token statistics come with x; raises unless ``x_mean`` and ``x_var`` come together."""
    if (x_mean is None) != (x_var is None):
        raise ValueError("x_mean and x_var are given together or not at all, got only "
                         f"{'x_mean' if x_var is None else 'x_var'}")
    return x_mean is not None


def given_token_stats(x_mean: torch.Tensor | None, x_var: torch.Tensor | None, eps: float, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The token ``mean, rstd [B, N]`` (new contiguous tensors in ``dtype``: an op's outputs never alias its
    inputs) from statistics given with x, ``x_mean`` and the biased variance ``x_var`` (e.g. cached with
    frozen features): ``rstd = rsqrt(var + eps)`` with the module's eps. None when neither is given."""
    if not stats_given(x_mean, x_var):
        return None
    mean = torch.empty(x_mean.shape, dtype=dtype, device=x_mean.device).copy_(x_mean)
    rstd = torch.empty_like(mean).copy_(x_var).add_(eps).rsqrt_()
    return mean, rstd


def scratch(numel: int, like: torch.Tensor, dtype: torch.dtype):
    """A flat buffer of ``numel`` elements that a chunk loop reuses (``view_front``), so the
    temporaries of one chunk are freed before the next chunk's exist."""
    return torch.empty(numel, dtype=dtype, device=like.device)


def view_front(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """The front of a flat ``buffer`` as a contiguous tensor of ``shape``."""
    numel = 1
    for d in shape:
        numel *= d
    return buffer[:numel].view(shape)


def centred_tokens(x: torch.Tensor, out: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor = None,
                   eps: float = 0.0) -> torch.Tensor:
    """``x [b, C, N]`` (any strides) minus its token means, written to ``out [C, b, N]`` (channels
    outermost: ``out.view(C, b * N)`` is one GEMM operand, and ``out[:, j]`` sample j's map) and returned.

    With ``rstd`` given, the token statistics are computed first and written into ``mean`` and ``rstd``
    ``[b, N]``: two passes (the mean, then the centred sum of squares), exact with a large common offset
    (x + 1000). Without it, ``mean`` holds them already (backward, or statistics given with x). The rstd
    is never applied to the ``[C, b, N]`` map: every product scales its ``[P, b, N]``-sized side by it instead.
    """
    xt = x.transpose(0, 1)                                                         # [C, b, N], a view
    if rstd is not None:
        torch.mean(xt, 0, dtype=mean.dtype, out=mean)
    torch.sub(xt, mean, out=out)
    if rstd is not None:
        torch.linalg.vector_norm(out, dim=0, out=rstd)
        rstd.square_().div_(out.shape[0]).add_(eps).rsqrt_()
    return out


def layernorm_bwd_centred_(e: torch.Tensor, xc: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dx ``[C, ...]`` from ``e = rstd * dxhat`` and the centred tokens ``xc`` (``xhat = rstd * xc``):
    ``e - mean_c(e) - xc rstd^2 mean_c(e xc)``, ``layernorm_bwd_`` without forming ``xhat``; written over
    ``e`` (one map-sized temporary, ``e * xc``, lives for one op)."""
    proj = (e * xc).mean(0).mul_(rstd.square())
    return e.sub_(e.mean(0)).addcmul_(xc, proj, value=-1)


def head_major(xc: torch.Tensor, h: int) -> torch.Tensor:
    """A ``[C, b, N]`` channels-first map as ``[h, b, N, d]`` (head j's channels, token-major), copied once so
    every head's product with it runs in one batched GEMM over (head, sample); with one head a view."""
    c, b, n = xc.shape
    if h == 1:  # one head: a view (every [N, C] matrix of it is a transposed one, which GEMMs take as it is)
        return xc.permute(1, 2, 0).unsqueeze(0)
    return xc.view(h, c // h, b, n).permute(0, 2, 3, 1).contiguous()


def softmax_(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place."""
    s.sub_(s.amax(-1, keepdim=True)).exp_()
    return s.div_(s.sum(-1, keepdim=True))


def softmax_bwd_(dp: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """dS = P * (dP - rowsum(P * dP)), written over ``dp``."""
    return dp.sub_((probs * dp).sum(-1, keepdim=True)).mul_(probs)


def reduce_heads(probs: torch.Tensor, how: str, dim: int, out: torch.Tensor) -> torch.Tensor:
    """``attn`` from the per-head probabilities: the mean or the max over ``dim``, into ``out``."""
    if how == "max":
        return torch.amax(probs, dim, out=out)
    return torch.mean(probs, dim, out=out)


def reduce_heads_grad_(dp: torch.Tensor, dattn: torch.Tensor, probs: torch.Tensor, how: str) -> torch.Tensor:
    """Adds the gradient of ``attn`` to ``dp [h, b, P, N]`` (``probs`` alike, ``dattn [b, P, N]``): ``dattn / h``
    to every head for the mean; for the max, ``dattn`` to the heads that reach it, shared evenly between ties
    (``torch.amax``'s gradient). The heads that reach the max are read from ``probs`` itself."""
    h = probs.shape[0]
    if how != "max" or h == 1:
        return dp.add_(dattn, alpha=1.0 / h)
    top = probs == probs.amax(0, keepdim=True)
    share = top.to(dp.dtype)
    share.div_(share.sum(0, keepdim=True))
    return dp.addcmul_(share, dattn)


def layernorm_bwd_(dxhat: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dx from the gradient of the normalised tokens, reducing over dim 0 (channels): ``[C, ...]``, written
    over ``dxhat`` (one map-sized temporary, ``dxhat * xhat``, lives for one op)."""
    proj = (dxhat * xhat).mean(0)
    return dxhat.sub_(dxhat.mean(0)).addcmul_(xhat, proj, value=-1).mul_(rstd)


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` (``mm`` or ``bmm`` by rank), written straight into ``out`` when the operands have its
    dtype (fp32 dots), else taken in the operands' dtype (16-bit operands) and rounded once into ``out``."""
    mm = torch.bmm if a.dim() == 3 else torch.mm
    if a.dtype == out.dtype:
        return mm(a, b, out=out)
    return out.copy_(mm(a, b))


def accumulate_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool = False) -> None:
    """``out += a @ b`` (``out = a @ b`` when ``first``: the first chunk writes ``out``, which then needs no
    zero fill), the product taken with the operands in their own dtype (16-bit operands under autocast),
    accumulated into ``out`` in its dtype."""
    if first:
        matmul_into(out, a, b)
    elif a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += torch.mm(a, b)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[b]] = b``, without a host synchronisation."""
    return torch.argsort(perm)


# ------------------------------------------------------------------------------------ mixed precision
# dot_precision values: "tf32" / "ieee" keep fp32 GEMM operands (on a GPU the Triton kernels run fp32
# dots in TF32 or in full fp32); "bf16" / "fp16" round the operands to that dtype, accumulating in
# fp32, as torch.autocast runs the reference's matmuls. Statistics, softmax and its logsumexp stay fp32.
AMP_PRECISIONS = {torch.bfloat16: "bf16", torch.float16: "fp16"}
LOW_PRECISION_DOTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device_type: str):
    """The dtype ``torch.autocast`` runs matmuls in on this device type now, or None."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_softmax_dtype(device_type: str, amp: torch.dtype) -> torch.dtype:
    """The dtype the reference's softmax returns under autocast: fp32 on CUDA (softmax is on CUDA
    autocast's fp32 list), the autocast dtype on CPU (it runs in its input's dtype there)."""
    return torch.float32 if device_type == "cuda" else amp


def operand_dtype(dot_precision: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype GEMM operands are rounded to under ``dot_precision`` (``dtype`` for fp32 dots)."""
    return LOW_PRECISION_DOTS.get(dot_precision, dtype)


def element_bytes(dt: torch.dtype, od: torch.dtype) -> tuple[int, int]:
    """``(eb, ob)`` for a chunk planner: the bytes of a temporary's element in the compute dtype ``dt``, and of
    a GEMM operand's copy when the operands are rounded to a narrower ``od`` (bf16/fp16: their copies and the
    GEMMs' 16-bit results are temporaries too); ``ob`` is 0 when the operands keep the compute dtype."""
    return dt.itemsize, (od.itemsize if od.itemsize < dt.itemsize else 0)


# ------------------------------------------------------------------------------------ pooled mixed views
# K mixed views pool over parts (docs/design.md, "The algebra" 7 and 8): view k of sample b takes mask[k, b] of
# sample b's parts and 1 - mask[k, b] of sample perm[b]'s. Per sample j that is 2K rows over its own
# parts: its own views (k), and the views of the sample inv[j] it was mixed into (K + k).

def pool_matrix(mask: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype,
                samples: slice = slice(None)) -> torch.Tensor:
    """``M [b, 2K, P]`` (contiguous) for the ``samples`` of ``mask [K, B, P]``: row k weighs sample j's
    parts for its own view k by ``mask[k, j]``, row K + k for view k of the sample it was mixed into by
    ``1 - mask[k, inv[j]]`` (``inv = perm^-1``); divided by P (the mean over parts). The mask math in the
    mask's dtype (fp32: ``m / P`` and ``(1 - m) / P`` sum to ``1 / P``), then ``dtype``."""
    own = mask[:, samples].transpose(0, 1)
    partner = (1 - mask[:, inv[samples]]).transpose(0, 1)
    return torch.cat([own, partner], 1).div_(mask.shape[-1]).to(dtype)


def mixed_views(rows: torch.Tensor, perm: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[K, B, D]`` from per-sample rows ``[B, 2K, D]`` (``pool_matrix``'s rows times features): view k of
    sample b is its own row k plus row K + k of ``perm[b]``, the sample mixed into it."""
    k = rows.shape[1] // 2
    return torch.add(rows[:, :k].transpose(0, 1), rows[perm, k:].transpose(0, 1), out=out)


def mixed_views_bwd(dviews: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype,
                    samples: slice = slice(None)) -> torch.Tensor:
    """The gradient of ``mixed_views``' rows, ``[b, 2K, D]`` in ``dtype`` for the ``samples`` of ``dviews [K, B,
    D]``: sample j's own views, then the views of the sample it was mixed into (``inv = perm^-1``). A view
    of the concatenation (not contiguous)."""
    return torch.cat([dviews[:, samples], dviews[:, inv[samples]]]).transpose(0, 1).to(dtype)
