"""sampling/grid_labels.py: the pictures of a sample grid are pasted unchanged under bands holding their labels."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sampling.grid_labels import fit, label_grid


def test_label_grid_keeps_every_pixel_and_writes_each_label():
    rng = np.random.default_rng(0)
    grid = Image.fromarray(rng.integers(0, 256, (2 * 48, 3 * 40, 3), dtype=np.uint8))  # 2 prompts x 3 seeds
    prompts = ["a large purple circle on a white background, center, and a very long tail of words", "a square"]
    out = np.asarray(label_grid(grid, prompts, [0, 1, 2]))
    font = ImageFont.load_default()
    band = ImageDraw.Draw(grid).textbbox((0, 0), "Ag, seed 0", font=font)[3] + 4
    assert out.shape == (band + 2 * (band + 48), 3 * 40, 3)
    pixels = np.asarray(grid)
    for r in range(2):  # each row of pictures, exactly (the reference: the unlabelled grid)
        y = band + r * (band + 48) + band
        assert np.array_equal(out[y : y + 48], pixels[r * 48 : (r + 1) * 48])
    for y in (0, band, band + (band + 48)):  # each band (seeds, prompt 1, prompt 2): white with black text in it
        text = out[y : y + band]
        assert (text == 255).mean() > 0.5 and (text < 128).any()
    for c in range(3):  # a seed label over each column
        assert (out[:band, c * 40 : (c + 1) * 40] < 128).any()
    # the long prompt is cut to the width, with '...', exactly as fit() says; a short one is kept whole
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cut = fit(draw, prompts[0], font, 3 * 40 - 4)
    assert cut.endswith("...") and len(cut) < len(prompts[0]) and draw.textlength(cut, font=font) <= 3 * 40 - 4
    assert fit(draw, "a square", font, 116) == "a square"
    reference = Image.new("RGB", (3 * 40, band), "white")
    ImageDraw.Draw(reference).text((2, 2), cut, fill="black", font=font)
    assert np.array_equal(out[band : 2 * band], np.asarray(reference))  # the first prompt's band, pixel for pixel
