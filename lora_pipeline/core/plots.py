"""Line charts as PNG files (loss curves): matplotlib without pyplot's global state, deterministic bytes."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lora_pipeline.core.fileio import atomic_write_bytes


@contextmanager
def line_chart(path: Path, title: str, xlabel: str, size: tuple[float, float] = (8, 4)) -> Iterator[Axes]:
    """Yield axes to draw on; on exit label them, add the legend and write the PNG atomically.

    No `Software` tag and no timestamp go into the file, so the same data gives the same bytes.
    """
    figure = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    yield axes
    axes.set_xlabel(xlabel)
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())
