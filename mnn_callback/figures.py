"""Dashboard figures: which pictures the sinks get besides the scalars, rendered to PNG bytes."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mnn_callback.results import DashboardImage

__all__ = ["Dashboards", "render_dashboard"]

# Dashboard images: ~70 KB each at this resolution (a run with 1000 probes: ~70 MB of images)
FIGURE_DPI = 72
HEATMAP_METRICS = ("mnn", "matrix_entropy")


@dataclass
class Dashboards:
    """Which pictures the sinks draw besides the scalars; each switchable (all on by default).

    ``layout``: TensorBoard custom-scalars charts, one per metric with all layers.
    ``layer_profile``: at each probe, metric vs layer at the current step over a few earlier ones.
    ``heatmap_every``: every K probes, layer x step heatmaps of MNN and Matrix Entropy so far,
    and W&B line-series charts with all layers (0: never).
    """

    layout: bool = True
    layer_profile: bool = True
    heatmap_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.heatmap_every, bool) or not isinstance(self.heatmap_every, int) or self.heatmap_every < 0:
            raise ValueError(f"heatmap_every must be an integer >= 0, got {self.heatmap_every!r}")

    @classmethod
    def off(cls) -> Dashboards:
        return cls(layout=False, layer_profile=False, heatmap_every=0)

    @classmethod
    def of(cls, value: Dashboards | bool) -> Dashboards:
        """``value`` itself, or all (True) or none (False) of the pictures."""
        if isinstance(value, Dashboards):
            return value
        if isinstance(value, bool):
            return cls() if value else cls.off()
        raise TypeError(f"dashboards must be a Dashboards or a bool, got {type(value).__name__}")


def render_dashboard(
    rows: Sequence[dict[str, Any]], step: int, *, layer_profile: bool = True, heatmaps: bool = False
) -> list[DashboardImage]:
    """The dashboard PNGs for the history ``rows`` (long table of one run) at ``step``.

    Needs matplotlib (``pip install 'mnn-callback[plot]'``).
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("dashboard figures need matplotlib: pip install 'mnn-callback[plot]'")
    from mnn_callback import plots

    images = []
    if layer_profile:
        figure = plots.layer_profile_figure(rows)
        images.append(DashboardImage("mnn_callback/layer_profile", plots.png_bytes(figure, FIGURE_DPI), step))
    if heatmaps and len({row["step"] for row in rows}) >= 2:
        for metric in HEATMAP_METRICS:
            if any(row.get(metric) is not None for row in rows):
                figure = plots.heatmap_figure(rows, metric)
                images.append(
                    DashboardImage(f"mnn_callback/heatmap_{metric}", plots.png_bytes(figure, FIGURE_DPI), step)
                )
    return images
