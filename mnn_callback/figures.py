"""Dashboard figures: which pictures the sinks get besides the scalars, rendered to PNG bytes."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mnn_callback.guard import Guard
from mnn_callback.results import DashboardImage, Measurement
from mnn_callback.sinks import SinkSet
from mnn_callback.tables import history_rows

__all__ = ["DashboardFeed", "Dashboards", "FigureWorker", "render_dashboard"]

# Dashboard images: plots.COMPACT_SIZE at twice the pixels TensorBoard shows them with (sharp on
# high-density screens, and at "Show actual image size")
FIGURE_DPI = 160
HEATMAP_METRICS = ("mnn", "matrix_entropy")


@dataclass
class Dashboards:
    """Which pictures the sinks draw besides the scalars; each switchable (all on by default).

    ``layout``: TensorBoard custom-scalars charts, one per metric with all layers.
    ``layer_profile``: at each probe, metric vs layer at the current step over a few earlier ones.
    ``heatmap_every``: every K probes, layer x step heatmaps of MNN and Matrix Entropy so far,
    and W&B line-series charts with all layers (0: never); also at the final probe (two or more
    probes).
    ``background``: draw on a background thread (True, the default), so figures cost the training
    thread only the hand-over; False draws on the training thread.
    """

    layout: bool = True
    layer_profile: bool = True
    heatmap_every: int = 10
    background: bool = True

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
        figure = plots.layer_profile_figure(rows, compact=True)
        images.append(DashboardImage("mnn_callback/layer_profile", plots.png_bytes(figure, FIGURE_DPI), step))
    if heatmaps and len({row["step"] for row in rows}) >= 2:
        for metric in HEATMAP_METRICS:
            if any(row.get(metric) is not None for row in rows):
                figure = plots.heatmap_figure(rows, metric, compact=True)
                images.append(
                    DashboardImage(f"mnn_callback/heatmap_{metric}", plots.png_bytes(figure, FIGURE_DPI), step)
                )
    return images


@dataclass
class _Request:
    """What is still to be drawn: a layer profile per step, the heatmaps at one step, from the history rows."""

    rows: list[dict[str, Any]]
    profile_steps: list[int]
    heatmap_step: int | None


class FigureWorker:
    """Draws dashboard figures on a background thread, off the training thread.

    :meth:`request` hands over the history; a request still waiting replaces the older one, which
    it absorbs (its layer profiles are drawn from the newer history, so none is lost), so at most
    one request waits. :meth:`collect`, on the training thread, takes the finished images, each
    with the step it belongs to. The thread lives only while there is work (an idle worker has no
    thread; at interpreter exit a running one finishes its figure first); :meth:`close` waits for
    everything requested. ``background=False`` draws in :meth:`request` itself.
    """

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._condition = threading.Condition()
        self._pending: _Request | None = None
        self._done: list[DashboardImage] = []
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None

    def request(self, rows: Sequence[dict[str, Any]], step: int, *, layer_profile: bool, heatmaps: bool) -> None:
        """Draw, from ``rows`` (the history up to ``step``), the layer profile and/or the heatmaps at ``step``."""
        new = _Request(list(rows), [step] if layer_profile else [], step if heatmaps else None)
        if not new.profile_steps and new.heatmap_step is None:
            return
        if not self.background:
            self._done.extend(_render(new))
            return
        with self._condition:
            if self._pending is not None:  # absorb the older request: its steps are drawn from the newer rows
                new.profile_steps = self._pending.profile_steps + new.profile_steps
                new.heatmap_step = new.heatmap_step if new.heatmap_step is not None else self._pending.heatmap_step
            self._pending = new
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="mnn_callback figures")
                self._thread.start()

    def collect(self) -> list[DashboardImage]:
        """The images finished so far (oldest first); a drawing error is raised here, on the caller's thread."""
        with self._condition:
            images, self._done = self._done, []
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]
        return images

    def _work(self) -> None:
        while True:
            with self._condition:
                request, self._pending = self._pending, None
                if request is None:  # nothing left: the thread ends
                    self._thread = None
                    self._condition.notify_all()
                    return
            try:
                images, error = _render(request), None
            except Exception as caught:  # reported on the training thread by collect()
                images, error = [], caught
            with self._condition:
                self._done.extend(images)
                if error is not None:
                    self._errors.append(error)

    def close(self) -> None:
        """Wait until everything requested is drawn (the thread has ended)."""
        with self._condition:
            while self._thread is not None:
                self._condition.wait()


def _render(request: _Request) -> list[DashboardImage]:
    images = []
    for step in request.profile_steps:
        rows = [row for row in request.rows if row["step"] <= step]
        images += render_dashboard(rows, step, layer_profile=True, heatmaps=False)
    if request.heatmap_step is not None:
        rows = [row for row in request.rows if row["step"] <= request.heatmap_step]
        images += render_dashboard(rows, request.heatmap_step, layer_profile=False, heatmaps=True)
    return images


class DashboardFeed:
    """The pictures of one run, fed to the sinks: the layout once, a layer profile per probe, heatmaps
    every ``heatmap_every`` probes and at the final probe; drawn off the training thread by a
    :class:`FigureWorker` and handed to the sinks on the training thread (:meth:`poll`)."""

    def __init__(self, dashboards: Dashboards, guard: Guard) -> None:
        self.dashboards = dashboards
        self.guard = guard
        self.worker = FigureWorker(background=dashboards.background)
        self._layout_logged = False
        self._probes = 0
        self._heatmaps_at: int | None = None

    def after_measurement(self, sinks: SinkSet, measurement: Measurement, history: list, *, final: bool) -> None:
        """Ask for the pictures of ``measurement`` (the last entry of ``history``)."""
        if measurement.result is None or not sinks.shows_images:
            return  # nothing to draw for: no figure is built
        if self.dashboards.layout and not self._layout_logged:
            self._layout_logged = True
            sinks.log_layout(measurement.layers)
        self._probes += 1
        every = self.dashboards.heatmap_every
        heatmaps = bool(every) and (self._probes % every == 0 or (final and self._probes >= 2))
        if not (self.dashboards.layer_profile or heatmaps):
            return
        rows = history_rows(history)
        self.worker.request(rows, measurement.step, layer_profile=self.dashboards.layer_profile, heatmaps=heatmaps)
        if heatmaps:
            self._heatmaps_at = measurement.step
            sinks.log_series(rows, measurement.step)
        self.poll(sinks)

    def poll(self, sinks: SinkSet) -> None:
        """Hand the finished images to the sinks (the training thread's only figure work)."""
        images = self.guard.call("drawing the dashboard figures", self.worker.collect)
        sinks.log_images(images or [])

    def finish(self, sinks: SinkSet, history: list) -> None:
        """The heatmaps of the whole run (if the last probe did not draw them), then wait for every picture."""
        steps = [entry["step"] for entry in history]
        every = self.dashboards.heatmap_every
        if every and sinks.shows_images and len(steps) >= 2 and self._heatmaps_at != steps[-1]:
            self.worker.request(history_rows(history), steps[-1], layer_profile=False, heatmaps=True)
            self._heatmaps_at = steps[-1]
        self.worker.close()
        self.poll(sinks)
