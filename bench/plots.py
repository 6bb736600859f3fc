"""PNG plots of the report's sweeps: median time (IQR band) and peak memory against the swept parameter."""
from __future__ import annotations

from pathlib import Path

from .tables import IMPL_NAMES, median_ms, mib, params_text

__all__ = ["sweep_plotter"]

STYLES = {"fused": ("tab:blue", "o"), "fused_compiled": ("tab:purple", "v"), "reference": ("tab:red", "s"),
          "compiled": ("tab:green", "^")}


def sweep_plotter(out: Path):
    """``plot(case, var, rest, series, impls) -> PNG name or None`` writing into ``out`` (None without
    matplotlib, which is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def plot(case: str, var: str, rest: tuple, series: dict, impls: list[str]) -> str | None:
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
        for impl in impls:
            color, marker = STYLES.get(impl, ("tab:gray", "x"))
            label = IMPL_NAMES.get(impl, impl)
            xs = [x for x, _ in series[impl]]
            ax_t.plot(xs, [median_ms(b) for _, b in series[impl]], marker=marker, color=color, label=label)
            ax_t.fill_between(xs, [b["stats"]["q1"] * 1e3 for _, b in series[impl]],
                              [b["stats"]["q3"] * 1e3 for _, b in series[impl]], color=color, alpha=0.2)
            peaks = [(x, mib(b, "peak_bytes")) for x, b in series[impl] if mib(b, "peak_bytes") is not None]
            if peaks:
                ax_m.plot([x for x, _ in peaks], [p for _, p in peaks], marker=marker, color=color, label=label)
        for ax, ylabel in ((ax_t, "median time (ms), IQR band"), (ax_m, "peak live tensors (MiB)")):
            ax.set_xlabel(var)
            ax.set_ylabel(ylabel)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend()
        device = next(iter(series.values()))[0][1].get("extra_info", {}).get("device", "")
        fig.suptitle(f"{case} vs {var}" + (f" ({params_text(rest)})" if rest else "") + f"\n{device}", fontsize=9)
        fig.tight_layout()
        name = f"{case}_vs_{var}" + "".join(f"_{k}{v}" for k, v in rest) + ".png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return name

    return plot
