"""The one matrix product every kernel calls: ``mma(a, b, acc, PRECISION)`` = ``acc + a @ b`` in fp32.

``PRECISION`` (a constexpr from the kernel's plan, ``plans.dot_constexpr``) says what the operands are
rounded to before the product; the accumulator is fp32 in every case:

- ``"tf32"``, ``"tf32x3"``, ``"ieee"``: fp32 operands at that ``tl.dot`` input precision (tensor-core
  TF32, three TF32 products, or fp32 FMA / AMD fp32 MFMA).
- ``"bf16"``, ``"fp16"``: operands cast to that dtype (round to nearest even), as ``torch.autocast``
  runs a GEMM: tensor cores at the 16-bit rate, half the shared memory per operand tile.
- ``"bf16_rounded"``: the interpreter's stand-in for ``"bf16"``, whose bf16 ``tl.dot`` is broken and
  whose fp32 -> bf16 cast does not round to nearest: operands rounded to bf16 by integer arithmetic,
  kept in fp32 and multiplied exactly. Products of bf16 values are exact in fp32, so the result is a
  GPU's bf16 dot up to the order of the fp32 accumulation.

Statistics, softmax and logsumexp never go through here: they stay fp32 whatever ``PRECISION`` is.
"""
import triton
import triton.language as tl


@triton.jit
def round_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), returned as fp32. Integer arithmetic on
    the bits: exact under the interpreter too; infinities and NaN stay what they are."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_operand(x, PRECISION: tl.constexpr):
    """``x`` as ``mma`` feeds it to the product: in bf16 / fp16, rounded to bf16 and kept in fp32
    (``"bf16_rounded"``), or in fp32."""
    if PRECISION == "bf16":
        return x.to(tl.bfloat16)
    elif PRECISION == "fp16":
        return x.to(tl.float16)
    elif PRECISION == "bf16_rounded":
        return round_bf16(x.to(tl.float32))
    else:
        return x.to(tl.float32)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with the operands rounded as ``PRECISION`` says (module docstring); fp32 ``acc``."""
    a = round_operand(a, PRECISION)
    b = round_operand(b, PRECISION)
    if PRECISION == "bf16" or PRECISION == "fp16":
        return tl.dot(a, b, acc)
    elif PRECISION == "bf16_rounded":
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)
