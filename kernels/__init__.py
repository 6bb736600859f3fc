"""Triton kernels of c2f, installed as ``c2f.kernels``: one op per launcher module, kernels beside it.

- ``part_attention`` (launchers) with ``part_attention_fwd`` / ``part_attention_bwd`` (kernels)
- ``part_mixup`` (kernels and launchers)
- ``plans`` (one launch plan per kernel), ``targets`` (GPU limits), ``launch`` (launch and recording),
  ``inspect`` (the offline compile check: ``python -m c2f.kernels.inspect``)

Nothing here is imported by ``import c2f``; the ops in ``c2f.ops`` import a launcher module when the
Triton backend is first used, so triton stays optional.
"""
