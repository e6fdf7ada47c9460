"""Dashboard figures: which pictures the sinks get besides the scalars, rendered to PNG bytes."""

from __future__ import annotations

import threading
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mnn_callback.core.errors import MNNWarning
from mnn_callback.core.guard import Guard
from mnn_callback.output.sinks import SinkSet
from mnn_callback.output.tables import history_rows
from mnn_callback.probing.results import DashboardImage, Measurement

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


def _matplotlib_installed() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_dashboard(
    rows: Sequence[dict[str, Any]], step: int, *, layer_profile: bool = True, heatmaps: bool = False
) -> list[DashboardImage]:
    """The dashboard PNGs for the history ``rows`` (long table of one run) at ``step``.

    Needs matplotlib (``pip install 'mnn-callback[plot]'``).
    """
    if not _matplotlib_installed():
        raise ImportError("dashboard figures need matplotlib: pip install 'mnn-callback[plot]'")
    from mnn_callback.output import plots

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
    """What is still to be drawn: layer profiles and the heatmaps, each as (step, the rows it is drawn from)."""

    profiles: list[tuple[int, list[dict[str, Any]]]]
    heatmaps: tuple[int, list[dict[str, Any]]] | None


class FigureWorker:
    """Draws dashboard figures on a background thread, off the training thread.

    :meth:`request` hands over what to draw; a request still waiting is merged into the newer one,
    so at most one request waits, holding at most :attr:`WAITING_PROFILES` layer profiles (the
    oldest beyond that are dropped and counted in :attr:`dropped`) and the newest heatmaps: the
    end of a run waits for a bounded amount of drawing, however many probes came faster than
    figures are drawn. :meth:`collect`, on the training
    thread, takes the finished images, each with the step it belongs to. The thread lives only
    while there is work (at interpreter exit a running one finishes its figure first);
    :meth:`close` waits for it. ``background=False`` draws in :meth:`request` itself.
    """

    WAITING_PROFILES = 4

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self.dropped = 0  # layer profiles dropped from a full backlog before they were drawn
        self._condition = threading.Condition()
        self._pending: _Request | None = None
        self._done: list[DashboardImage] = []
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None

    def request(
        self,
        *,
        profile: tuple[int, list[dict[str, Any]]] | None = None,
        heatmaps: tuple[int, list[dict[str, Any]]] | None = None,
    ) -> None:
        """Draw the layer profile of ``profile = (step, rows)`` and/or the heatmaps of ``heatmaps = (step, rows)``."""
        new = _Request([] if profile is None else [profile], heatmaps)
        if profile is None and heatmaps is None:
            return
        if not self.background:
            self._done.extend(_render(new))
            return
        with self._condition:
            if self._pending is not None:
                profiles = self._pending.profiles + new.profiles
                self.dropped += max(0, len(profiles) - self.WAITING_PROFILES)
                new.profiles = profiles[-self.WAITING_PROFILES :]
                new.heatmaps = new.heatmaps or self._pending.heatmaps
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
    for step, rows in request.profiles:
        images += render_dashboard(rows, step, layer_profile=True, heatmaps=False)
    if request.heatmaps is not None:
        step, rows = request.heatmaps
        images += render_dashboard(rows, step, layer_profile=False, heatmaps=True)
    return images


class DashboardFeed:
    """The pictures of one run, fed to the sinks: the layout once, a layer profile per probe, heatmaps
    every ``heatmap_every`` probes and at the final probe; drawn off the training thread by a
    :class:`FigureWorker` and handed to the sinks on the training thread (:meth:`poll`).

    The long-table rows of the run grow by one probe's rows per probe; a layer profile is drawn
    from the last few probes' rows only, so its cost on the training thread does not grow with
    the run. Without matplotlib no figure is requested (one warning; the scalars go on).
    """

    PROFILE_STEPS = 5  # the layer profile shows the current step over up to four earlier ones

    def __init__(self, dashboards: Dashboards, guard: Guard) -> None:
        self.dashboards = dashboards
        self.guard = guard
        self.worker = FigureWorker(background=dashboards.background)
        self.rows: list[dict[str, Any]] = []  # the run's long table so far, appended per probe
        self._recent: deque[list[dict[str, Any]]] = deque(maxlen=self.PROFILE_STEPS)  # rows of the last probes
        self._recent_spectral: deque[list[dict[str, Any]]] = deque(maxlen=self.PROFILE_STEPS)  # ... with spectra
        self._layout_logged = False
        self._probes = 0
        self._heatmaps_at: int | None = None
        self._drawable: bool | None = None

    def seed(self, history: Sequence[dict[str, Any]]) -> None:
        """Start from a restored history (a resumed run): its rows come first in the heatmaps."""
        self.rows = []
        self._recent.clear()
        self._recent_spectral.clear()
        for entry in history:
            self._add(history_rows([entry]))

    def _add(self, new_rows: list[dict[str, Any]]) -> None:
        self.rows.extend(new_rows)
        if new_rows:
            self._recent.append(new_rows)
            if any(row.get("matrix_entropy") is not None for row in new_rows):
                self._recent_spectral.append(new_rows)

    def _can_draw(self) -> bool:
        if self._drawable is None:
            self._drawable = _matplotlib_installed()
            if not self._drawable:
                warnings.warn(
                    "mnn_callback: dashboard figures need matplotlib, which is not installed: no layer profiles or "
                    "heatmaps (the scalars are logged as usual); pip install 'mnn-callback[plot]', or "
                    "dashboards=Dashboards(layer_profile=False, heatmap_every=0)",
                    MNNWarning,
                    stacklevel=5,
                )
        return self._drawable

    def _profile_rows(self) -> list[dict[str, Any]]:
        groups = {id(group): group for group in [*self._recent_spectral, *self._recent]}
        return [row for group in sorted(groups.values(), key=lambda group: group[0]["step"]) for row in group]

    def after_measurement(
        self, sinks: SinkSet, measurement: Measurement, entry: dict[str, Any], *, final: bool
    ) -> None:
        """Ask for the pictures of ``measurement`` (``entry``: its history entry, the run's latest)."""
        if measurement.result is None or not sinks.shows_images:
            return  # nothing to draw for: no figure is built
        if self.dashboards.layout and not self._layout_logged:
            self._layout_logged = True
            sinks.log_layout(measurement.layers)
        new_rows = history_rows([entry])
        self._add(new_rows)
        self._probes += 1
        every = self.dashboards.heatmap_every
        heatmaps = bool(every) and (self._probes % every == 0 or (final and self._probes >= 2))
        if heatmaps:
            self._heatmaps_at = measurement.step
            sinks.log_series(self.rows, measurement.step)
        if not (self.dashboards.layer_profile or heatmaps) or not new_rows or not self._can_draw():
            return
        step = measurement.step
        self.worker.request(
            profile=(step, self._profile_rows()) if self.dashboards.layer_profile else None,
            heatmaps=(step, list(self.rows)) if heatmaps else None,
        )
        self.poll(sinks)

    def poll(self, sinks: SinkSet) -> None:
        """Hand the finished images to the sinks (the training thread's only figure work)."""
        images = self.guard.call("drawing the dashboard figures", self.worker.collect)
        sinks.log_images(images or [])

    def finish(self, sinks: SinkSet) -> None:
        """The heatmaps of the whole run (if the last probe did not draw them), then wait for the figures."""
        last = self.rows[-1]["step"] if self.rows else None
        every = self.dashboards.heatmap_every
        wanted = every and sinks.shows_images and last is not None and self._heatmaps_at != last
        if wanted and len({row["step"] for row in self.rows}) >= 2 and self._can_draw():
            self.worker.request(heatmaps=(last, list(self.rows)))
            self._heatmaps_at = last
        self.worker.close()
        self.poll(sinks)
