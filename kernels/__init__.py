"""Triton kernels of c2f, installed as ``c2f.kernels``: one op per launcher module, kernels beside it.

- ``part_attention`` (launchers) with ``part_attention_fwd`` / ``part_attention_bwd`` (kernels)
- ``part_mixup`` (kernels and launchers)
- ``c2f_head`` (launchers) with ``c2f_head_fwd`` / ``c2f_head_bwd`` (kernels): the fused head, which
  never forms the part features
- ``plans`` (one launch plan per kernel), ``targets`` (GPU limits), ``launch`` (launch and recording),
  ``inspect`` (the offline compile check: ``python -m c2f.kernels.inspect``)

Nothing here is imported by ``import c2f``; the ops in ``c2f.ops`` import a launcher module when the
Triton backend is first used, so triton stays optional.
"""
