"""Triton kernels of c2f, installed as ``c2f.kernels``: one op per launcher module, kernels beside it.

- ``part_attention`` (launchers) with ``part_attention_fwd`` / ``part_attention_bwd`` (kernels)
- ``part_mixup`` (kernels and launchers)
- ``c2f_head`` (launchers) with ``c2f_head_fwd`` / ``c2f_head_bwd`` (kernels): the fused head, which
  never forms the part features
- ``plans_part_attention``, ``plans_part_mixup``, ``plans_c2f_head`` (one launch plan per kernel, by op) on
  ``plans`` (what the plans share: tile rules, shrink-to-fit, dot precisions, ``PlanError``)
- ``common`` (what the launchers share: argument checks, strides, making the plans), ``targets`` (GPU
  limits), ``launch`` (launch and recording), ``inspect`` (the offline compile check: ``python -m
  c2f.kernels.inspect``, its grid in ``inspect_cases``)

Nothing here is imported by ``import c2f``; the ops in ``c2f.ops`` import a launcher module when the
Triton backend is first used, so triton stays optional.
"""
