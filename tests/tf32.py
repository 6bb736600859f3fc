"""TF32 rounding for the Triton interpreter, test-only: the GPU's TF32 error, checked on a CPU.

The interpreter multiplies fp32 ``tl.dot`` operands exactly whatever ``input_precision`` says. An
NVIDIA tensor core given fp32 registers for a TF32 ``mma`` reads only their top 19 bits: the 13 low
mantissa bits are ignored (truncation; Triton emits no rounding ``cvt`` before ``mma...tf32``, checked
in the PTX of sm_80 and sm_90 compiles). ``emulating_tf32()`` patches the interpreter's dot so fp32
operands of a ``"tf32"`` dot are truncated the same way; accumulation stays fp32. Nothing in the
package changes: production code pays nothing.
"""
import contextlib

import numpy as np

TF32_DROPPED_BITS = 13      # fp32 has 23 mantissa bits, TF32 keeps 10


def truncate_tf32(a: np.ndarray) -> np.ndarray:
    """fp32 values with the 13 low mantissa bits cleared (toward zero), as a TF32 tensor core reads them."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return (bits & np.uint32(~((1 << TF32_DROPPED_BITS) - 1) & 0xFFFFFFFF)).view(np.float32)


@contextlib.contextmanager
def emulating_tf32():
    """Inside: the interpreter's ``tl.dot(..., input_precision="tf32")`` on fp32 operands truncates both."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == np.float32 == b.data.dtype:
            a = interpreter.TensorHandle(truncate_tf32(a.data), a.dtype)
            b = interpreter.TensorHandle(truncate_tf32(b.data), b.dtype)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_dot = original
