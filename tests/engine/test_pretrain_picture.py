"""The reconstruction picture of `ummae pretrain` shows a spread of the data set, not its first files."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from tiny import run_cli_captured, tiny_pretrain_args
from ummae.visualize import HEADER_HEIGHT, MIN_PANEL_WIDTH, PANEL_GAP

# A class-sorted folder: train/<class>/*.png, each class one solid colour.
COLOURS = {"a_red": (220, 30, 30), "b_green": (30, 200, 30), "c_blue": (30, 30, 220), "d_yellow": (220, 220, 30)}
IMG_SIZE = 64  # the tiny run's data.img_size


def test_picture_of_a_class_sorted_folder_shows_every_class(tmp_path):
    data = tmp_path / "train"
    for name, colour in COLOURS.items():
        (data / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), colour).save(data / name / f"{i}.png")
    out = tmp_path / "run"
    result = run_cli_captured(tiny_pretrain_args(out, "--data", str(data), "--set", "train.vis_images=4",
                                                 "--max-steps", "1"), out)
    assert result.code == 0, result.err

    picture = np.asarray(Image.open(out / "reconstructions.png").convert("RGB")).astype(int)
    side = IMG_SIZE * math.ceil(MIN_PANEL_WIDTH / IMG_SIZE)
    shown = []
    for row in range(4):  # the centre pixel of each row's "original" panel (the first column)
        y = HEADER_HEIGHT + PANEL_GAP + row * (side + PANEL_GAP) + side // 2
        pixel = picture[y, PANEL_GAP + side // 2]
        nearest = min(COLOURS, key=lambda c: np.abs(pixel - np.array(COLOURS[c])).sum())
        assert np.abs(pixel - np.array(COLOURS[nearest])).max() <= 8, (row, pixel)  # a class colour
        shown.append(nearest)
    # The first 4 files would all be a_red; a spread over the 16 sorted files shows each class once.
    assert shown == list(COLOURS)
