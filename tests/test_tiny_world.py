"""The tiny world (tools/tiny_world.py): deterministic specs and pictures, the held-back colour, the CLI,
and the pixel classifiers' accuracy on rendered ground truth."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tools import tiny_world as tw


def test_specs_are_deterministic_and_seeded():
    assert tw.sample_specs(50, seed=3) == tw.sample_specs(50, seed=3)
    assert tw.sample_specs(50, seed=3) != tw.sample_specs(50, seed=4)
    assert tw.sample_specs(10, seed=3) == tw.sample_specs(50, seed=3)[:10]


def test_held_back_colour_only_when_asked():
    assert tw.HELD_BACK == "purple"
    assert all(s.colour != "purple" for s in tw.sample_specs(2000, seed=0))
    assert any(s.colour == "purple" for s in tw.sample_specs(200, seed=0, include_held_back=True))
    only = tw.sample_specs(100, seed=0, only={"colour": "purple", "shape": ["square", "star"]})
    assert {s.colour for s in only} == {"purple"} and {s.shape for s in only} == {"square", "star"}


def test_every_value_appears_and_white_or_black_only_where_visible():
    specs = tw.sample_specs(3000, seed=1)
    for field, values in (("shape", tw.SHAPES), ("size", tw.SIZES), ("position", tw.POSITIONS),
                          ("background", tw.BACKGROUNDS)):
        assert {getattr(s, field) for s in specs} == set(values)
    assert {s.colour for s in specs} == set(tw.COLOURS) - {"purple"}
    assert all(s.colour not in s.background.split(" and ") for s in specs)


def test_bad_only_is_an_error():
    with pytest.raises(ValueError, match="colour"):
        tw.sample_specs(5, seed=0, only={"colour": ["pink"]})


def test_caption():
    spec = tw.ShapeSpec("circle", "red", "small", "top left", "white")
    assert tw.caption(spec) == "a small red circle on a white background, top left"
    two_tone = tw.ShapeSpec("star", "blue", "large", "center", "gray and black")
    assert tw.caption(two_tone) == "a large blue star on a gray and black background, center"


@pytest.mark.parametrize("size", [32, 64, 100])
def test_render_size_and_determinism(size):
    spec = tw.sample_specs(1, seed=5)[0]
    a, b = tw.render(spec, size), tw.render(spec, size)
    assert a.size == (size, size) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()


def test_render_layout():
    # Two-tone: top half one tone, bottom half the other; the shape is where the caption says.
    spec = tw.ShapeSpec("square", "red", "small", "bottom right", "white and black")
    px = np.asarray(tw.render(spec, 64)).astype(int)
    assert tuple(px[0, 0]) == tw.COLOURS["white"] and tuple(px[63, 0]) == tw.COLOURS["black"]
    ys, xs = np.nonzero(np.all(px == tw.COLOURS["red"], axis=-1))
    assert ys.min() > 32 and xs.min() > 32


def test_shapes_never_touch_the_left_and_right_borders():
    # The classifiers read the background there.
    for spec in tw.sample_specs(300, seed=2):
        px = np.asarray(tw.render(spec, 64)).astype(int)
        border = np.concatenate([px[:, :2], px[:, -2:]], axis=1)
        assert (border == border[:, :1]).all(), tw.caption(spec)


@pytest.mark.parametrize("size", [32, 64])
def test_classifiers_on_rendered_ground_truth(size):
    # Measured on 1000 pictures: colour 100% at both sizes, shape 100% at 64 px, 99.7% at 32 px.
    specs = tw.sample_specs(600, seed=7, include_held_back=True)
    images = [tw.render(s, size) for s in specs]
    colour = np.mean([tw.dominant_colour(im) == s.colour for im, s in zip(images, specs, strict=True)])
    shape = np.mean([tw.shape_of(im) == s.shape for im, s in zip(images, specs, strict=True)])
    assert colour >= 0.99 and shape >= 0.97, (colour, shape)


def test_classifiers_survive_noise():
    # Generated pictures are not clean: pixel noise of std 12 (of 255) changes little.
    rng = np.random.default_rng(0)
    specs = tw.sample_specs(300, seed=8, include_held_back=True)
    noisy = [Image.fromarray(np.clip(np.asarray(tw.render(s)) + rng.normal(0, 12, (64, 64, 3)), 0, 255)
                             .astype(np.uint8)) for s in specs]  # fmt: skip
    assert np.mean([tw.dominant_colour(im) == s.colour for im, s in zip(noisy, specs, strict=True)]) >= 0.97
    assert np.mean([tw.shape_of(im) == s.shape for im, s in zip(noisy, specs, strict=True)]) >= 0.9


def test_classifiers_on_a_blank_image():
    blank = Image.new("RGB", (64, 64), tw.GREY)
    assert tw.dominant_colour(blank) == "none" and tw.shape_of(blank) == "none"


def test_colour_names():
    for name, rgb in tw.COLOURS.items():
        assert tw.colour_name(rgb) == name


def test_write_folder(tmp_path):
    specs = tw.write_folder(tmp_path, 4, seed=0, size=48)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"0000{i}.{e}" for i in range(4) for e in ("png", "txt")]
    assert (tmp_path / "00002.txt").read_text() == tw.caption(specs[2]) + "\n"
    assert Image.open(tmp_path / "00002.png").size == (48, 48)


def test_cli_held_back_only(tmp_path):
    run = subprocess.run([sys.executable, "-m", "tools.tiny_world", str(tmp_path), "--num-images", "6",
                          "--size", "32", "--seed", "1", "--held-back-only"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    captions = [p.read_text() for p in sorted(tmp_path.glob("*.txt"))]
    assert len(captions) == 6 and all(" purple " in c for c in captions)
    assert all(tw.dominant_colour(Image.open(p)) == "purple" for p in tmp_path.glob("*.png"))
