"""Labels on a training run's sample grid: each column's seed on top, each row's prompt above its row.

Drawn with PIL's default font (`ImageFont.load_default`, `ImageDraw.text`), black on white bands between the
rows, so a grid opened alone says what it shows; the pictures themselves are pasted unchanged.
"""

from PIL import Image, ImageDraw, ImageFont

PAD = 2  # pixels around each label


def fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut and ended with '...' where it is wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def label_grid(grid: Image.Image, prompts: list[str], seeds: list[int]) -> Image.Image:
    """A grid of len(prompts) rows x len(seeds) columns of equal cells -> the same cells under a header band of
    seeds, each row under a band with its prompt (cut to the grid's width)."""
    font = ImageFont.load_default()
    cell_w, cell_h = grid.width // len(seeds), grid.height // len(prompts)
    band = ImageDraw.Draw(grid).textbbox((0, 0), "Ag, seed 0", font=font)[3] + 2 * PAD  # one line of text
    out = Image.new("RGB", (grid.width, band + len(prompts) * (band + cell_h)), "white")
    draw = ImageDraw.Draw(out)
    for c, seed in enumerate(seeds):
        draw.text((c * cell_w + PAD, PAD), fit(draw, f"seed {seed}", font, cell_w - 2 * PAD), fill="black", font=font)
    for r, prompt in enumerate(prompts):
        y = band + r * (band + cell_h)  # the prompt's band, then its row of pictures
        draw.text((PAD, y + PAD), fit(draw, prompt, font, grid.width - 2 * PAD), fill="black", font=font)
        out.paste(grid.crop((0, r * cell_h, grid.width, (r + 1) * cell_h)), (0, y + band))
    return out
