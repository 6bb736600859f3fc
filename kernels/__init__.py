"""Triton kernels of c2f: one op per module, launchers that validate, allocate and launch.

Nothing here is imported by ``import c2f``; ``c2f._backend.load_kernels`` imports a module on demand.
"""
