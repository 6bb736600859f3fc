"""Roofline model: compulsory bytes and FLOPs of each op, and the time they imply on a named GPU.

A projection, not a measurement. Each kernel (fused op, or one op of the unfused reference) must at
least move its compulsory bytes (every input read once, every output written once) and do its matmul
FLOPs; its time is at least ``max(bytes / bandwidth, flops / peak)`` on the target. The unfused
reference pays that per op, with every intermediate written and read back. Elementwise FLOPs
(softmax, LayerNorm, mixing) are left out: every op here is far from compute-bound on them.

Targets (``TARGETS``; dense peaks, no sparsity; fp32 runs as TF32 on the tensor cores):
- A100 SXM 80 GB: 2.039 TB/s HBM2e; 312 TFLOP/s bf16, 156 TF32 (NVIDIA A100 datasheet, as tabulated at
  glennklockwood.com/garden/processors/A100).
- H100 SXM: 3.35 TB/s HBM3; 989 TFLOP/s bf16, 495 TF32 (NVIDIA H100 datasheet, as tabulated at
  glennklockwood.com/garden/processors/h100).
- RTX 4090 (the consumer sm_89 class, also the L40S's architecture): 1.008 TB/s GDDR6X; 165 TFLOP/s bf16
  with fp32 accumulate, 82.6 TF32 and 82.6 fp32 without tensor cores (NVIDIA's Ada specifications, as
  tabulated at waredb.com/processor/nvidia-geforce-rtx-4090; the 4090's bf16 rate with fp32 accumulate
  is half its fp16-accumulate rate).

Shapes: ``x [B, C, N]``, ``P`` queries, ``h`` heads with the key projection folded into ``G [h, P, C]``
(docs/design.md: S_j = G_j Xc is ``2 P C N`` FLOPs per head and sample, parts ``2 P N C`` per sample).
Statistics, probabilities and folded queries are fp32 whatever the storage dtype ``s``.
"""
from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
F32 = 4


@dataclass(frozen=True)
class Target:
    name: str
    bandwidth: float             # bytes/s
    peak: dict                   # dtype -> dense FLOP/s (fp32 as TF32 tensor-core math)


TARGETS = {
    "A100": Target("A100 SXM 80GB", 2.039e12, {"bf16": 312e12, "fp32": 156e12}),
    "H100": Target("H100 SXM", 3.35e12, {"bf16": 989e12, "fp32": 495e12}),
    "RTX4090": Target("RTX 4090", 1.008e12, {"bf16": 165.2e12, "fp32": 82.6e12}),
}
H100 = TARGETS["H100"]
H100_BW, H100_PEAK = H100.bandwidth, H100.peak   # kept for callers of the single-target model


@dataclass(frozen=True)
class Shape:
    B: int = 64
    C: int = 2048
    N: int = 196
    P: int = 312
    h: int = 1
    K: int = 4


@dataclass
class OpCost:
    op: str          # what runs
    impl: str        # "fused" or "reference"
    dtype: str
    bytes: float
    flops: float

    def time_s(self, target: Target = H100) -> float:
        return max(self.bytes / target.bandwidth, self.flops / target.peak[self.dtype])

    def bound(self, target: Target = H100) -> str:
        return "memory" if self.bytes / target.bandwidth >= self.flops / target.peak[self.dtype] else "compute"


def attention_fwd(sh: Shape, dtype: str) -> list[OpCost]:
    """Fused: stats + S = G Xc + softmax + parts in one pass over X (the stats pass re-reads X: not counted)."""
    s = DTYPE_BYTES[dtype]
    B, C, N, P, h = sh.B, sh.C, sh.N, sh.P, sh.h
    fold = OpCost(f"query fold Q' = Q Wk (h={h})", "fused", dtype,
                  bytes=(P * C + C * C) * s + h * P * C * F32, flops=2 * P * C * C)
    main = OpCost(f"attention fwd (h={h})", "fused", dtype,
                  bytes=B * C * N * s + h * P * C * F32 + 2 * C * F32        # x, G, gamma/beta
                  + B * P * C * s + B * h * P * N * F32 + 2 * B * N * F32,    # parts, probs, mean/rstd
                  flops=B * (2 * h * P * C * N + 2 * P * N * C))
    return [fold, main]


def attention_bwd(sh: Shape, dtype: str, needs_dx: bool = False) -> list[OpCost]:
    """Fused backward: dprobs = dparts Xc (2PCN), values recomputed for dgamma (2PNC), dG = dS Xc^T (2hPNC)."""
    s = DTYPE_BYTES[dtype]
    B, C, N, P, h = sh.B, sh.C, sh.N, sh.P, sh.h
    nbytes = (B * C * N * s + B * h * P * N * F32 + 2 * B * N * F32        # x, probs, mean/rstd
              + B * P * C * s + B * P * N * s + 2 * C * F32                 # dparts, dattn, gamma/beta
              + h * P * C * F32 + 2 * C * F32)                               # dG, dgamma/dbeta
    flops = B * (2 * P * C * N + 2 * P * N * C + 2 * h * P * N * C)
    if needs_dx:
        nbytes += B * C * N * s + h * P * C * F32
        flops += B * (2 * h * P * C * N + 2 * P * N * C)
    return [OpCost(f"attention bwd (h={h}{', dx' if needs_dx else ''})", "fused", dtype, nbytes, flops)]


def reference_attention_fwd(sh: Shape, dtype: str) -> list[OpCost]:
    """c2f.reference.PartAttention, one kernel per op, every intermediate written to memory."""
    s = DTYPE_BYTES[dtype]
    B, C, N, P, h = sh.B, sh.C, sh.N, sh.P, sh.h
    return [
        OpCost("ref: LayerNorm (x as [B,N,C])", "reference", dtype, 2 * B * N * C * s + 2 * B * N * F32, 0),
        OpCost("ref: key projection k(t)", "reference", dtype, 2 * B * N * C * s + C * C * s, 2 * B * N * C * C),
        OpCost(f"ref: scores q k^T (h={h})", "reference", dtype, B * N * C * s + P * C * s + B * h * P * N * s,
               2 * B * P * C * N),
        OpCost("ref: softmax", "reference", dtype, 2 * B * h * P * N * s, 0),
        OpCost("ref: values attn t", "reference", dtype, B * h * P * N * s + B * N * C * s + B * P * C * s,
               2 * B * P * N * C),
        OpCost("ref: attn mean over heads", "reference", dtype, B * h * P * N * s + B * P * N * s, 0),
    ]


def reference_attention_bwd(sh: Shape, dtype: str) -> list[OpCost]:
    """Backward of the reference ops (x frozen): two matmuls per forward matmul, then LayerNorm's."""
    s = DTYPE_BYTES[dtype]
    B, C, N, P, h = sh.B, sh.C, sh.N, sh.P, sh.h
    return [
        OpCost("ref bwd: values (d attn, d t)", "reference", dtype,
               B * P * C * s + B * h * P * N * s + B * N * C * s + B * h * P * N * s + B * N * C * s,
               4 * B * P * N * C),
        OpCost("ref bwd: softmax", "reference", dtype, 3 * B * h * P * N * s, 0),
        OpCost("ref bwd: scores (d q, d keys)", "reference", dtype,
               B * h * P * N * s + B * N * C * s + P * C * s + P * C * s + B * N * C * s, 4 * B * P * C * N),
        OpCost("ref bwd: key projection (d W, d t)", "reference", dtype,
               2 * B * N * C * s + C * C * s + C * C * s + B * N * C * s, 4 * B * N * C * C),
        OpCost("ref bwd: LayerNorm (d gamma, d beta)", "reference", dtype, 3 * B * N * C * s, 0),
    ]


def mixup_inplace(sh: Shape, dtype: str) -> list[OpCost]:
    """part_mixup_ forward (backward is the same kernel on the gradient): each pair read once, written once."""
    s = DTYPE_BYTES[dtype]
    B, C, P = sh.B, sh.C, sh.P
    return [OpCost("part_mixup_ (in place)", "fused", dtype, 2 * B * P * C * s + B * P * F32 + B * 8, 0)]


def reference_mixup(sh: Shape, dtype: str, K: int = 1) -> list[OpCost]:
    """``m * parts + (1 - m) * parts[perm]``: a gather, two broadcasts to [K, B, P, C] and a sum."""
    s = DTYPE_BYTES[dtype]
    B, C, P = sh.B, sh.C, sh.P
    one, many = B * P * C * s, K * B * P * C * s
    return [OpCost(f"ref: parts[perm] (K={K})", "reference", dtype, 2 * one, 0),
            OpCost(f"ref: m * parts (K={K})", "reference", dtype, one + many, 0),
            OpCost(f"ref: (1 - m) * parts[perm] (K={K})", "reference", dtype, one + many, 0),
            OpCost(f"ref: sum (K={K})", "reference", dtype, 3 * many, 0)]


def reference_mixup_bwd(sh: Shape, dtype: str, K: int = 1) -> list[OpCost]:
    """Autograd of the reference mixup: both products' gradients, reduced over K, scattered back by perm."""
    s = DTYPE_BYTES[dtype]
    B, C, P = sh.B, sh.C, sh.P
    one, many = B * P * C * s, K * B * P * C * s
    ops = [OpCost(f"ref bwd: m * dY, (1 - m) * dY (K={K})", "reference", dtype, 4 * many, 0)]
    if K > 1:
        ops.append(OpCost(f"ref bwd: sum over K (K={K})", "reference", dtype, 2 * (many + one), 0))
    ops.append(OpCost("ref bwd: index backward (scatter) + add", "reference", dtype, 6 * one, 0))
    return ops


def mixup_pool(sh: Shape, dtype: str, backward: bool) -> list[OpCost]:
    """part_mixup_pool: ``pooled [K, B, C]`` as one [K, P] x [P, C] contraction per sample; backward likewise."""
    s = DTYPE_BYTES[dtype]
    B, C, P, K = sh.B, sh.C, sh.P, sh.K
    nbytes = B * P * C * s + K * B * P * F32 + K * B * C * s
    name = f"part_mixup_pool {'bwd' if backward else 'fwd'} (K={K})"
    return [OpCost(name, "fused", dtype, nbytes, 2 * K * B * P * C)]


def reference_mixup_pool(sh: Shape, dtype: str, backward: bool) -> list[OpCost]:
    s = DTYPE_BYTES[dtype]
    B, C, P, K = sh.B, sh.C, sh.P, sh.K
    if backward:
        return [OpCost(f"ref bwd: mean over parts (expand, K={K})", "reference", dtype,
                       K * B * C * s + K * B * P * C * s, 0)] + reference_mixup_bwd(sh, dtype, K)
    return reference_mixup(sh, dtype, K) + [
        OpCost(f"ref: mean over parts (K={K})", "reference", dtype, K * B * P * C * s + K * B * C * s, 0)]


def head_step(sh: Shape, dtype: str) -> list[OpCost]:
    """The fused C2F head's kernels (docs/design.md, "The algebra" 8): forward reads x once for the scores
    and the readout (``4 P C N`` per sample) and the pooled rows (``2 (2K) N C``); backward forms dS and
    dZ ``[B, P, N]`` and contracts them with x for dG and dWrg (``4 P N C``). ``[B, P, C]`` never exists."""
    s = DTYPE_BYTES[dtype]
    B, C, N, P, K, h = sh.B, sh.C, sh.N, sh.P, sh.K, sh.h
    x, pn, w = B * C * N * s, B * P * N * F32, 2 * P * C * F32
    fwd = OpCost(f"head fwd (K={K})", "fused", dtype, x + w + 3 * pn + 2 * B * N * F32 + B * 2 * K * C * F32,
                 B * (4 * h * P * C * N + 2 * (2 * K) * N * C))
    bwd_ds = OpCost("head bwd dS, dZ", "fused", dtype, 4 * pn + B * 2 * K * N * F32, 2 * B * (2 * K) * N * C)
    bwd_dw = OpCost("head bwd dG, dWrg", "fused", dtype, x + 2 * pn + 2 * B * N * F32 + w, B * 4 * h * P * N * C)
    return [fwd, bwd_ds, bwd_dw]


def reference_head_step(sh: Shape, dtype: str) -> list[OpCost]:
    """c2f.reference.C2FHead, forward and backward: the attention, the per-part regressor on ``[B, P, C]``,
    the part mixup of K views, the mean over parts and the classifier, each op paying its own traffic."""
    s = DTYPE_BYTES[dtype]
    B, C, P = sh.B, sh.C, sh.P
    parts = B * P * C * s
    regressor = [OpCost("ref: attribute regressor on parts", "reference", dtype, parts + P * C * s, 2 * B * P * C),
                 OpCost("ref bwd: attribute regressor", "reference", dtype, 2 * parts + P * C * s, 4 * B * P * C)]
    return (reference_attention_fwd(sh, dtype) + reference_attention_bwd(sh, dtype) + regressor
            + reference_mixup_pool(sh, dtype, False) + reference_mixup_pool(sh, dtype, True))


def ops(B: int = 64) -> list[tuple[str, list[OpCost]]]:
    """(group, fused ops + reference ops) for every group the report projects."""
    groups = []
    for dtype in ("bf16", "fp32"):
        for h in (1, 16):
            sh = Shape(B=B, h=h)
            groups.append((f"attention fwd h={h}", attention_fwd(sh, dtype) + reference_attention_fwd(sh, dtype)))
            groups.append((f"attention bwd h={h}", attention_bwd(sh, dtype) + reference_attention_bwd(sh, dtype)))
        sh = Shape(B=B, K=4)
        groups.append(("C2F head step K=4", head_step(sh, dtype) + reference_head_step(sh, dtype)))
        sh = Shape(B=B)
        groups.append(("part_mixup fwd", mixup_inplace(sh, dtype) + reference_mixup(sh, dtype)))
        groups.append(("part_mixup bwd", mixup_inplace(sh, dtype) + reference_mixup_bwd(sh, dtype)))
        for K in (4, 32):
            sh = Shape(B=B, K=K)
            for bwd in (False, True):
                groups.append((f"part_mixup_pool {'bwd' if bwd else 'fwd'} K={K}",
                               mixup_pool(sh, dtype, bwd) + reference_mixup_pool(sh, dtype, bwd)))
    return groups


def table(B: int = 64, target: Target = H100) -> list[dict]:
    """Rows (target, group, op, impl, dtype, bytes, flops, time_us, bound), fused beside reference."""
    return [{"target": target.name, "group": group, "op": o.op, "impl": o.impl, "dtype": o.dtype, "bytes": o.bytes,
             "flops": o.flops, "time_us": o.time_s(target) * 1e6, "bound": o.bound(target)}
            for group, group_ops in ops(B) for o in group_ops]


def summary(rows: list[dict]) -> list[dict]:
    """Per (group, dtype): total implied time of the fused ops and of the reference's ops, and their ratio."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["group"], r["dtype"])
        entry = out.setdefault(key, {"group": r["group"], "dtype": r["dtype"], "fused_us": 0.0, "reference_us": 0.0,
                                     "fused_bytes": 0.0, "reference_bytes": 0.0})
        entry[f"{r['impl']}_us"] += r["time_us"]
        entry[f"{r['impl']}_bytes"] += r["bytes"]
    for e in out.values():
        e["speedup"] = e["reference_us"] / e["fused_us"] if e["fused_us"] else float("nan")
    return list(out.values())


def markdown(B: int = 64, targets: tuple[str, ...] = ("A100", "H100", "RTX4090")) -> str:
    """Projected times per group on every target (fused / reference, and their ratio), then the per-op
    detail on the H100."""
    chosen = [TARGETS[t] for t in targets]
    specs = "; ".join(f"**{t.name}**: {t.bandwidth / 1e12:.2f} TB/s, {t.peak['bf16'] / 1e12:.0f} bf16 and "
                      f"{t.peak['fp32'] / 1e12:.1f} TF32 TFLOP/s" for t in chosen)
    lines = [f"Projections, not measurements (no such GPU ran these figures): {specs} (dense; sources in "
             f"`bench/roofline.py`). Time = max(bytes / bandwidth, FLOPs / peak) per kernel, B={B}, C=2048, "
             "N=196, P=312. Fused rows count compulsory bytes (each input read once, each output written once); "
             "reference rows are the unfused ops, each paying its own reads and writes.", "",
             "| group | dtype | " + " | ".join(f"{t.name}: fused / reference us (ratio)" for t in chosen) + " | "
             "fused MB | reference MB |", "|" + "---|" * (4 + len(chosen))]
    per_target = [summary(table(B, t)) for t in chosen]
    for i, e in enumerate(per_target[0]):
        cells = [f"{s[i]['fused_us']:.1f} / {s[i]['reference_us']:.1f} ({s[i]['speedup']:.1f}x)" for s in per_target]
        lines.append(f"| {e['group']} | {e['dtype']} | " + " | ".join(cells) +
                     f" | {e['fused_bytes'] / 1e6:.1f} | {e['reference_bytes'] / 1e6:.1f} |")
    lines += ["", f"<details><summary>Per op, {H100.name}</summary>", "",
              "| group | op | impl | dtype | MB | GFLOP | time (us) | bound |", "|---|---|---|---|---|---|---|---|"]
    for r in table(B, H100):
        lines.append(f"| {r['group']} | {r['op']} | {r['impl']} | {r['dtype']} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['flops'] / 1e9:.1f} | {r['time_us']:.1f} | {r['bound']} |")
    lines += ["", "</details>"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
