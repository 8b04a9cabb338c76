"""ambient_dist.images: model units -> pixels, PNG bytes, image grids."""
import io

import numpy as np
import torch
from PIL import Image

from ambient_dist.images import encode_png, image_grid, save_image_grid, to_uint8


def test_to_uint8_inverts_the_pixel_mapping_and_clamps():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_uint8(u8.float() / 127.5 - 1), u8)
    out = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5]))
    assert out.tolist() == [0, 0, 128, 255, 255] and out.dtype == torch.uint8


def test_png_bytes_decode_to_the_same_pixels_grey_and_colour():
    rng = np.random.default_rng(0)
    for channels, mode in ((1, "L"), (3, "RGB")):
        image = rng.integers(0, 256, (5, 7, channels), dtype=np.uint8)
        with Image.open(io.BytesIO(encode_png(image))) as im:
            assert im.mode == mode
            assert np.array_equal(np.asarray(im).reshape(5, 7, channels), image)


def test_image_grid_layout_and_units(tmp_path):
    images = torch.full((5, 1, 4, 6), -1.0)
    images[4] = 1.0
    grid = image_grid(images)  # 3 columns x 2 rows
    assert grid.shape == (8, 18, 1) and grid.dtype.name == "uint8"
    assert grid[0, 0, 0] == 0 and grid[4, 6, 0] == 255 and grid[4, 12, 0] == 0
    path = save_image_grid(torch.zeros(4, 3, 8, 8), tmp_path / "g.png")
    assert Image.open(path).size == (16, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temporary file left
