"""Captions as kohya users keep them (training/data/captions.py); --dataset_config subsets
(training/data/dataset_config.py)."""

import numpy as np
import pytest
import yaml

from common.errors import ConfigError
from tests.test_data_loader import mixed_folder, write
from training.config import parse_config, validate
from training.data.captions import CaptionStyle, finish_caption, shuffle_tags
from training.data.datasets import build_dataset


def test_prefix_suffix_and_separator_without_shuffling():
    style = CaptionStyle(prefix="sks,", suffix="masterpiece")
    assert finish_caption("dog, grass", style, False) == "sks, dog, grass masterpiece"
    assert finish_caption("", style, False) == "sks, masterpiece"  # an image without a caption: the trigger word
    sep = CaptionStyle(separator="|||")
    assert finish_caption("sks dog ||| grass, sky ||| best", sep, False) == "sks dog, grass, sky, best"
    assert finish_caption("sks dog ||| grass", sep, True) == "sks dog ||| grass"  # split when shuffled


def test_shuffle_keeps_the_tags_around_the_separator_in_place():
    caption = "sks dog, outdoors ||| a, b, c, d, e ||| best, hq"
    for seed in range(20):
        out = shuffle_tags(caption, np.random.default_rng(seed), keep=0, separator="|||").split(", ")
        assert out[:2] == ["sks dog", "outdoors"] and out[-2:] == ["best", "hq"]
        assert sorted(out[2:-2]) == ["a", "b", "c", "d", "e"]
    # no separator in the caption: the first `keep` tags stay, the rest follow rng.permutation (the old rule)
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    tags = ["t0", "t1", "t2", "t3", "t4"]
    expected = tags[:2] + [tags[2:][i] for i in ref.permutation(3)]
    assert shuffle_tags(", ".join(tags), rng, keep=2, separator="|||") == ", ".join(expected)


def test_caption_extension_prefix_and_suffix_reach_the_batches(tmp_path):
    write(tmp_path, "a.png", (64, 64), caption="from txt")
    (tmp_path / "a.caption").write_text("red circle\n")
    write(tmp_path, "b.png", (64, 64), caption=None)
    data = build_dataset(tmp_path, 64, 2, captions=CaptionStyle(".caption", "sks", "photo"))
    assert [r.caption for r in data.records] == ["sks red circle photo", "sks photo"]
    assert data.summary()["missing_captions"] == [str(tmp_path / "b.png")]
    assert sorted(next(data.iter_epoch(0))["captions"]) == ["sks photo", "sks red circle photo"]


def write_config(tmp_path, subsets) -> str:
    path = tmp_path / "dataset.yaml"
    path.write_text(yaml.safe_dump({"subsets": subsets}))
    return str(path)


def test_dataset_config_repeats_each_folder_with_its_own_captions(tmp_path):
    mixed_folder(tmp_path / "a", 4)
    for i in range(2):
        write(tmp_path / "b", f"x{i}.png", (150, 150), caption=None)
        (tmp_path / "b" / f"x{i}.caption").write_text(f"cap{i}")
    config = write_config(tmp_path, [{"image_dir": "a", "num_repeats": 3, "caption_prefix": "class_a,"},
                                     {"image_dir": "b", "num_repeats": 2, "caption_extension": ".caption"}])
    data = build_dataset(None, 192, 1, dataset_config=config, captions=CaptionStyle(suffix="end"))
    captions = [r.caption for r in data.records]
    assert len(captions) == 4 * 3 + 2 * 2
    assert captions[:3] == ["class_a, tag0, red, blue, green, small end"] * 3
    assert captions[12:] == ["cap0 end", "cap0 end", "cap1 end", "cap1 end"]
    assert data.records[12].key == "2/x0.png" and data.summary()["num_images"] == 16
    # every repeat is its own sample: all 16 trained in an epoch, each repeat with its own crop and flip
    seen = sorted(i for batch in data.batches_for_epoch(0) for i, _, _ in batch)
    assert seen == list(range(16))


@pytest.mark.parametrize("subsets, message", [
    ([{"image_dir": "a", "num_repeat": 2}], "subset 1: unknown key 'num_repeat'"),
    ([{"image_dir": "nope"}], "subset 1: image_dir"),
    ([{"image_dir": "a", "num_repeats": 0}], "subset 1: num_repeats 0 must be an integer >= 1"),
    ([{"image_dir": "a", "caption_extension": "txt"}], "subset 1: caption_extension 'txt' must start with a dot"),
    ([], "must hold one key, `subsets:`"),
])
def test_bad_dataset_config_is_one_line_before_training(tmp_path, subsets, message):
    mixed_folder(tmp_path / "a", 2)
    config = write_config(tmp_path, subsets)
    args = parse_config(["--dataset_config", config, "--pretrained_model", "tiny", "--output_dir",
                         str(tmp_path / "out")])
    with pytest.raises(ConfigError) as e:
        validate(args)
    assert str(e.value).startswith(f"--dataset_config {config}: {message}") and "\n" not in str(e.value)


def test_data_dir_or_dataset_config_exactly_one(tmp_path):
    mixed_folder(tmp_path / "a", 2)
    config = write_config(tmp_path, [{"image_dir": "a"}])
    common = ["--pretrained_model", "tiny", "--output_dir", str(tmp_path / "out")]
    validate(parse_config(["--dataset_config", config, *common]))
    for extra in ([], ["--dataset_config", config, "--data_dir", str(tmp_path / "a")]):
        with pytest.raises(ConfigError, match="^--data_dir"):
            validate(parse_config([*extra, *common]))
