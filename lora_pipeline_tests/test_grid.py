"""Grid composition: geometry, labels, highlight, PNG bytes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lora_pipeline.core.evaluation.grid import HIGHLIGHT, column_labels, compose_grid, plan_grid
from lora_pipeline.core.models.sampling import save_png

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def solid(colour, size=(64, 64)) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (*size, 3)).copy()


def test_grid_places_enlarged_cells_where_the_layout_says_and_frames_only_the_chosen_row(tmp_path):
    rows, cols = ["epoch 1", "epoch 2"], column_labels([0.8, 1.0])
    cells = [[solid(COLOURS[r * 3 + c]) for c in range(3)] for r in range(2)]
    title = "trg, a long prompt " * 6
    image = compose_grid(cells, rows, cols, title, "subtitle", highlight_row=1)
    layout = plan_grid((64, 64), rows, cols, title)
    assert cols == ["weight 0 (base)", "0.8", "1.0"]
    assert image.size == (layout.width, layout.height)
    assert layout.scale == 2 and layout.cell_w == 128 and len(layout.title_lines) > 1  # wrapped, enlarged
    pixels = np.asarray(image)
    for r in range(2):
        for c in range(3):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            assert (pixels[y0:y1, x0:x1] == COLOURS[r * 3 + c]).all()  # whole cell, nothing drawn over it
    # the chosen row (1) is framed in the highlight colour just outside its cells; row 0 is not
    x0, y0, _, _ = layout.cell_box(1, 0)
    assert tuple(pixels[y0 - 1, x0 + 5]) == HIGHLIGHT and tuple(pixels[y0 + 5, x0 - 1]) == HIGHLIGHT
    x0, y0, _, _ = layout.cell_box(0, 0)
    assert tuple(pixels[y0 - 1, x0 + 5]) != HIGHLIGHT
    # labels are drawn: the header band and the label column hold dark ink
    assert (pixels[layout.top:layout.body_top, layout.label_w:] < 100).any()
    assert (pixels[layout.body_top:, :layout.label_w] < 100).any()

    big = plan_grid((512, 512), rows, cols, "p")
    assert big.scale == 1 and big.font_size > layout.font_size  # text grows with the cells


def test_saved_png_bytes_depend_on_pixels_only(tmp_path):
    image = compose_grid([[solid(COLOURS[0])]], ["epoch 1"], ["weight 0 (base)"], "p", "s")
    save_png(image, tmp_path / "a.png")
    save_png(image.copy(), tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as loaded:
        assert not loaded.info.get("Software") and not loaded.text
