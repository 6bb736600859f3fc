"""Shared parity assertion: the fused result may err at most twice as much as the reference."""
import torch


def assert_within_reference_error(name, got, baseline, truth, atol_rel):
    """``|got - truth| <= 2 * |baseline - truth| + atol_rel * max|truth|`` (max norms), with a report."""
    truth = truth.double()
    err = (got.double() - truth).abs()
    ref_err = (baseline.double() - truth).abs().max().item()
    scale = truth.abs().max().item() or 1.0
    bound = 2 * ref_err + atol_rel * scale
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert err.max().item() <= bound, (
        f"{name}: max abs diff {err.max().item():.3e} (mean {err.mean().item():.3e}) exceeds "
        f"2 x reference error {ref_err:.3e} + {atol_rel:g} x max|truth| {scale:.3e}")
