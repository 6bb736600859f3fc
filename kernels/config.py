"""Block sizes and warps for every kernel, in one place, with the reason for each choice.

Launchers and the static GPU check (``kernels.inspect``) read the same numbers.
"""
from __future__ import annotations

import triton
