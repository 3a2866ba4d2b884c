"""Tests for training/data_loader.py and training/data/buckets.py: sources, bad files, image modes, bucket geometry
(expected crops computed by hand), augmentation, determinism / exact resume, rank splits, WebDataset shards.

Images are tiny (40-300 px) and written with PIL into tmp_path; everything runs on CPU in a few seconds.
"""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import DataError
from training.data.buckets import closest_bucket, cover_size, make_buckets, micro_batches, plan_steps
from training.data.datasets import FolderDataset, build_dataset
from training.data.images import sample_rng, to_tensor, transform_caption
from training.data.scan import scan_folder
from training.data.shards import ShardDataset


def gradient(width: int, height: int) -> Image.Image:
    """An RGB image whose every pixel differs from its horizontal mirror (red follows x, green follows y)."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 90)], -1).astype(np.uint8))


def write(root, name: str, size=(60, 40), caption: str | None = "a photo", image: Image.Image | None = None, **save):
    """Write root/name (a gradient of size (w, h) unless `image` is given) and its .txt caption unless None."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (image or gradient(*size)).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def expected_crop(path, bucket, top_left, flip=False) -> torch.Tensor:
    """Reference pixels computed independently: resize to cover, mirror if flipped, crop at the reported offset."""
    image = Image.open(path).convert("RGB")
    h, w = cover_size(image.height, image.width, bucket)
    image = image.resize((w, h), Image.Resampling.LANCZOS)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = top_left
    return to_tensor(image.crop((left, top, left + bucket[1], top + bucket[0])))


def mixed_folder(root, count: int = 12):
    """`count` captioned images: landscape, square and portrait sizes in turn (buckets at resolution 192)."""
    sizes = [(200, 100), (150, 150), (90, 180), (120, 70)]
    for i in range(count):
        write(root, f"img{i:02d}.png", sizes[i % len(sizes)], caption=f"tag{i}, red, blue, green, small")


def as_lists(batch: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) and k != "pixel_values" else v) for k, v in batch.items()}


def assert_same_batches(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert as_lists({k: v for k, v in x.items() if k != "pixel_values"}) == as_lists(
            {k: v for k, v in y.items() if k != "pixel_values"}
        )
        assert torch.equal(x["pixel_values"], y["pixel_values"])


# ---------------------------------------------------------------------------------------------------- buckets


def test_make_buckets_sdxl_list():
    buckets = make_buckets(1024)
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert h * w <= 1024 * 1024 and max(h, w) / min(h, w) <= 4
        assert (w, h) in buckets
    for bucket in [(1024, 1024), (832, 1216), (1216, 832), (768, 1344), (640, 1600), (512, 2048)]:
        assert bucket in buckets
    assert len(buckets) == 17
    assert make_buckets(192) == [(256, 128), (192, 192), (128, 256)]
    assert (128, 128) in make_buckets(160) and (128, 192) in make_buckets(160)  # the square is always there


def test_closest_bucket_and_plan_keep_buckets_apart():
    buckets = make_buckets(1024)
    assert buckets[closest_bucket(200, 300, buckets)] == (832, 1216)  # 1.5 vs 1.46
    assert buckets[closest_bucket(1000, 1000, buckets)] == (1024, 1024)
    bucket_of = [0, 1, 2, 1, 1, 0, 2, 2, 1, 0, 0]
    steps = plan_steps(bucket_of, 2, np.random.default_rng(0))
    assert all(len(s) == 2 and len({bucket_of[i] for i in s}) == 1 for s in steps)  # whole steps, one bucket each
    assert len({i for s in steps for i in s}) == 10  # 4 + 4 + 3 images: one image of the 3-image bucket sits out
    partial = plan_steps(bucket_of, 2, np.random.default_rng(0), keep_partial=True)  # validation: every image once
    assert sorted(i for s in partial for i in s) == list(range(len(bucket_of)))


def test_micro_batches_cut_a_step_the_same_way_for_any_split():
    """Micro-batch k of rank r is positions [(k W + r) B, (k W + r + 1) B): the union over ranks of micro-batch k
    is the same slice of the step for (B 2, W 1), (B 1, W 2); every position is used once."""
    step = list(range(100, 112))  # 12 images
    one = micro_batches(step, 3, 4, 0, 1)  # B 4 x A 3 x W 1
    two = [micro_batches(step, 3, 2, r, 2) for r in range(2)]  # B 2 x A 3 x W 2
    three = [micro_batches(step, 2, 2, r, 3) for r in range(3)]  # B 2 x A 2 x W 3
    assert [[i for i, _ in mb] for mb in one] == [step[0:4], step[4:8], step[8:12]]
    assert [two[0][k] + two[1][k] for k in range(3)] == one
    assert sorted(p for rank in three for mb in rank for _, p in mb) == list(range(12))


# ---------------------------------------------------------------------------------------------------- sources


def test_recursive_discovery_with_mixed_case_extensions(tmp_path):
    write(tmp_path, "a.JPG", caption="first")
    write(tmp_path, "sub/b.Png", caption="second")
    write(tmp_path, "sub/deeper/c.jpeg", caption="third")
    write(tmp_path, "d.WEBP", caption="fourth")
    write(tmp_path, ".cache/hidden.png")
    (tmp_path / "notes.md").write_text("not an image")
    scan = scan_folder(tmp_path)
    assert [r.key for r in scan.records] == ["a.JPG", "d.WEBP", "sub/b.Png", "sub/deeper/c.jpeg"]
    assert [r.caption for r in scan.records] == ["first", "fourth", "second", "third"]
    assert scan.num_images == 4 and not scan.bad_files and not scan.missing_captions


def test_metadata_jsonl_provides_captions(tmp_path, caplog):
    write(tmp_path, "a.png", caption="from txt")
    write(tmp_path, "sub/b.png", caption=None)
    lines = [{"file_name": "a.png", "text": "from metadata"}, {"file_name": "sub/b.png", "text": "nested"}]
    lines.append({"file_name": "gone.png", "text": "deleted"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dataset = build_dataset(tmp_path, 128, 1, max_bad_fraction=0.5)
    assert {r.key: r.caption for r in dataset.records} == {"a.png": "from metadata", "sub/b.png": "nested"}
    assert [reason for _, reason in dataset.summary()["bad_files"]] == ["listed in metadata.jsonl but does not exist"]
    assert "gone.png" in caplog.text


def test_messy_folder(tmp_path, caplog):
    good = write(tmp_path, "good.jpg", (80, 60))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not a JPEG")
    write(tmp_path, "cmyk.jpg", image=Image.new("CMYK", (64, 64), (0, 255, 255, 0)))  # red
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half fully transparent (black underneath)
    write(tmp_path, "rgba.png", image=rgba)
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(0, (0, 0, 32, 64))  # left half: index 0, the transparent one
    write(tmp_path, "palette.png", image=palette, transparency=0)
    write(tmp_path, "gray16.png", image=Image.fromarray(np.full((64, 64), 65535 // 4, np.uint16)))
    write(tmp_path, "gray.png", image=Image.new("L", (64, 64), 200))
    rotated = Image.new("RGB", (60, 40), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 30, 40))  # stored left half red: the top half once displayed
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    write(tmp_path, "rotated.jpg", image=rotated, exif=exif, quality=95)
    write(tmp_path, "nocap.png", caption=None)

    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(tmp_path, 64, 1, bucketing=False, center_crop=True, max_bad_fraction=0.5)
    bad = {p.split("/")[-1]: reason for p, reason in dataset.scan.bad_files}
    assert set(bad) == {"truncated.jpg", "empty.png", "notes.jpg"}
    assert "empty" in bad["empty.png"] and "not an image" in bad["notes.jpg"] and "truncated" in bad["truncated.jpg"]
    for name in ["truncated.jpg", "empty.png", "notes.jpg"]:
        assert sum(name in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1
    assert [p.split("/")[-1] for p in dataset.scan.missing_captions] == ["nocap.png"]
    assert f"no caption: {tmp_path / 'nocap.png'}" in caplog.text
    assert dataset.scan.num_images == 8

    index = {r.key: i for i, r in enumerate(dataset.records)}
    pixels = {key: dataset.load_example(i, 0).pixel_values for key, i in index.items()}
    for value in pixels.values():
        assert value.shape == (3, 64, 64) and value.dtype == torch.uint8  # shipped as 8 bits, made [-1, 1] later

    def rgb(key, y, x):
        return pixels[key][:, y, x].tolist()

    assert rgb("cmyk.jpg", 32, 32) == pytest.approx([255, 0, 0], abs=3)
    assert rgb("rgba.png", 32, 5) == [255, 255, 255] and rgb("rgba.png", 32, 60) == [0, 0, 255]  # on white
    assert rgb("palette.png", 32, 5) == [255, 255, 255] and rgb("palette.png", 32, 60) == [0, 255, 0]
    assert rgb("gray16.png", 32, 32) == [64, 64, 64]  # 16383 / 65535 * 255
    assert rgb("gray.png", 32, 32) == [200, 200, 200]
    example = dataset.load_example(index["rotated.jpg"], 0)
    assert example.original_size == (60, 40)  # (h, w) as displayed: portrait
    assert rgb("rotated.jpg", 5, 32) == pytest.approx([255, 0, 0], abs=8)  # top is red
    assert rgb("rotated.jpg", 60, 32) == pytest.approx([0, 0, 255], abs=8)  # bottom is blue


def test_too_many_bad_files_is_one_line_error(tmp_path):
    write(tmp_path, "ok1.png")
    write(tmp_path, "ok2.png")
    (tmp_path / "bad1.png").write_bytes(b"")
    (tmp_path / "bad2.jpg").write_text("nope")
    with pytest.raises(DataError) as error:
        build_dataset(tmp_path, 64, 1)
    message = str(error.value)
    assert "\n" not in message and "bad1.png" in message and "bad2.jpg" in message and "max_bad_fraction" in message
    assert isinstance(error.value, ValueError)


def test_missing_or_empty_data_dir(tmp_path):
    with pytest.raises(DataError, match="does-not-exist"):
        build_dataset(tmp_path / "does-not-exist", 64, 1)
    (tmp_path / "only.txt").write_text("a caption without an image")
    with pytest.raises(DataError, match="no images"):
        build_dataset(tmp_path, 64, 1)


def test_image_that_breaks_after_the_scan_is_replaced(tmp_path, caplog):
    for i in range(4):
        write(tmp_path, f"{i}.png", (64, 64))
    dataset = build_dataset(tmp_path, 64, 2, bucketing=False)
    (tmp_path / "2.png").write_bytes(b"corrupted since the scan")
    batches = list(dataset.iter_epoch(0))
    assert [len(b["keys"]) for b in batches] == [2, 2]
    keys = [k for b in batches for k in b["keys"]]
    assert "2.png" not in keys and keys.count("3.png") == 2  # the next image of the bucket stands in
    assert "2.png" in caplog.text


# ---------------------------------------------------------------------------------------------------- geometry


def test_micro_conditioning_by_hand(tmp_path):
    # 300x200 (w x h), no bucketing, 128 square: scale max(128/200, 128/300) = 0.64 -> 192x128, center crop left 32.
    path = write(tmp_path, "a.png", (300, 200))
    dataset = build_dataset(tmp_path, 128, 1, bucketing=False, center_crop=True)
    batch = next(dataset.iter_epoch(0))
    assert batch["original_size"].tolist() == [[200, 300]]
    assert batch["crop_top_left"].tolist() == [[0, 32]]
    assert batch["target_size"].tolist() == [[128, 128]]
    assert torch.equal(batch["pixel_values"][0], expected_crop(path, (128, 128), (0, 32)))

    # 310x200 at resolution 160: the 3:2 bucket 128x192 (ratio 1.55 vs 1.5); scale 0.64 -> 198x128, left (198-192)//2.
    path.unlink()
    path = write(tmp_path, "b.png", (310, 200))
    batch = next(build_dataset(tmp_path, 160, 1, center_crop=True).iter_epoch(0))
    assert batch["target_size"].tolist() == [[128, 192]] and batch["pixel_values"].shape == (1, 3, 128, 192)
    assert batch["crop_top_left"].tolist() == [[0, 3]]
    assert torch.equal(batch["pixel_values"][0], expected_crop(path, (128, 192), (0, 3)))

    # a portrait 100x300 image in a 128 square: scale 1.28 -> 128x384, center crop top (384-128)//2 = 128.
    path.unlink()
    write(tmp_path, "c.png", (100, 300))
    batch = next(build_dataset(tmp_path, 128, 1, bucketing=False, center_crop=True).iter_epoch(0))
    assert batch["original_size"].tolist() == [[300, 100]] and batch["crop_top_left"].tolist() == [[128, 0]]


def test_random_crop_and_flip_are_consistent(tmp_path):
    path = write(tmp_path, "a.png", (300, 200))  # resized to 192x128 in the 128 square: left in [0, 64]
    dataset = build_dataset(tmp_path, 128, 1, bucketing=False, random_flip=True, seed=3)
    seen_flips, lefts = set(), set()
    for epoch in range(12):
        example = dataset.load_example(0, epoch)
        sample = example.to_sample()
        top, left = example.crop_top_left
        assert top == 0 and 0 <= left <= 64 and example.crop_top_left_flipped == (0, 64 - left)
        assert torch.equal(example.pixel_values, expected_crop(path, (128, 128), (top, left)))
        if example.flip:
            assert torch.equal(sample["pixel_values"], example.pixel_values.flip(-1))
            assert not torch.equal(sample["pixel_values"], example.pixel_values)
        # what the UNet sees is the reported crop of the (mirrored if flipped) resized image
        assert torch.equal(
            sample["pixel_values"], expected_crop(path, (128, 128), sample["crop_top_left"], example.flip)
        )
        seen_flips.add(example.flip)
        lefts.add(left)
    assert seen_flips == {True, False} and len(lefts) > 3


def test_batches_are_single_bucket(tmp_path):
    mixed_folder(tmp_path, 12)
    dataset = build_dataset(tmp_path, 192, 2, random_flip=True)
    assert dataset.summary()["buckets"] == {"256x128": 3, "192x192": 3, "128x256": 6}
    keys = []
    for batch in dataset.iter_epoch(0):
        (h, w), *rest = batch["target_size"].tolist()
        assert all(size == [h, w] for size in rest) and h % 64 == 0 and w % 64 == 0
        assert batch["pixel_values"].shape[2:] == (h, w)
        keys += batch["keys"]
    assert len(keys) == len(set(keys)) == 10 and set(keys) <= {r.key for r in dataset.records}
    assert len(dataset) == 5  # 3 // 2 + 3 // 2 + 6 // 2: whole steps; one image of each 3-image bucket sits out


# ---------------------------------------------------------------------------------------------------- captions


def test_caption_dropout_rate_and_tag_shuffle():
    caption = "sks dog, photo, red, blue, green, small, outdoors"
    outputs = [transform_caption(caption, sample_rng(0, 0, i, 3), 0.3, True, 2) for i in range(4000)]
    assert 0.27 < sum(o == "" for o in outputs) / len(outputs) < 0.33
    kept = [o.split(", ") for o in outputs if o]
    assert all(tags[:2] == ["sks dog", "photo"] and sorted(tags) == sorted(caption.split(", ")) for tags in kept)
    assert len({tuple(tags) for tags in kept}) > 50
    assert transform_caption(caption, sample_rng(0, 0, 0, 3), 0.0, False, 0) == caption


# ---------------------------------------------------------------------------------------------------- determinism


def test_determinism_resume_and_workers(tmp_path):
    mixed_folder(tmp_path, 12)
    options = dict(random_flip=True, caption_dropout=0.2, shuffle_tags=True, keep_tokens=1, seed=7)
    a = build_dataset(tmp_path, 192, 2, **options)
    b = build_dataset(tmp_path, 192, 2, **options)
    assert a.batches_for_epoch(0) == b.batches_for_epoch(0) and a.batches_for_epoch(1) == b.batches_for_epoch(1)
    assert a.batches_for_epoch(0) != a.batches_for_epoch(1)
    assert a.batches_for_epoch(0) != build_dataset(tmp_path, 192, 2, **{**options, "seed": 8}).batches_for_epoch(0)

    epoch1 = list(a.iter_epoch(1))
    assert_same_batches(epoch1, list(b.iter_epoch(1)))
    assert_same_batches(epoch1[3:], list(b.iter_epoch(1, start=3)))  # resume at batch 3 of epoch 1
    assert_same_batches(epoch1, list(b.iter_epoch(1, num_workers=2)))
    epoch0 = list(a.iter_epoch(0))
    assert [x["keys"] for x in epoch0] != [x["keys"] for x in epoch1]
    assert [x["captions"] for x in epoch0] != [x["captions"] for x in epoch1]


def test_rank_split(tmp_path):
    mixed_folder(tmp_path, 16)  # 4 per size: every bucket holds an even number of images
    ranks = [build_dataset(tmp_path, 192, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    single = build_dataset(tmp_path, 192, 4, seed=1)
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    plans = [r.batches_for_epoch(0) for r in ranks]
    for step, (share0, share1) in enumerate(zip(*plans, strict=True)):
        assert len(share0) == len(share1) and not set(share0) & set(share1)
        assert share0 + share1 == single.batches_for_epoch(0)[step]  # DDP == one process with the global batch
    assert sorted(i for plan in plans for batch in plan for i, _, _ in batch) == list(range(16))
    keys = [k for r in ranks for batch in r.iter_epoch(0) for k in batch["keys"]]
    assert sorted(keys) == sorted(r.key for r in single.records)


def test_the_same_effective_batch_plans_the_same_steps_for_any_split(tmp_path):
    """Buckets of 4, 3 and 7 images, 2 images per step: one process (B 2), two (B 1) and one with accumulation
    (B 1, A 2) train the same images in the same steps with the same noise keys; whole steps only (one image of
    each odd bucket sits out the epoch, different ones each epoch)."""
    mixed_folder(tmp_path, 14)
    splits = {"B2": [build_dataset(tmp_path, 192, 2)],
              "B1xW2": [build_dataset(tmp_path, 192, 1, rank=r, world_size=2) for r in range(2)],
              "B1xA2": [build_dataset(tmp_path, 192, 1, accumulation=2)]}
    sat_out = []
    for epoch in range(2):
        steps = {}
        for name, ranks in splits.items():
            items = sorted(item for r in ranks for batch in r.batches_for_epoch(epoch) for item in batch)
            last = max(s for _, s, _ in items)
            steps[name] = [sorted((i, p) for i, s, p in items if s == k) for k in range(last + 1)]
        assert steps["B2"] == steps["B1xW2"] == steps["B1xA2"] and all(len(s) == 2 for s in steps["B2"])
        seen = [i for s in steps["B2"] for i, _ in s]
        assert len(seen) == len(set(seen)) == 12
        sat_out.append(set(range(14)) - set(seen))
    assert sat_out[0] != sat_out[1]


def test_buckets_smaller_than_a_global_batch_join_the_nearest_full_one(tmp_path):
    """Buckets of 3 images with a global batch of 4 (2 processes x 2): trained in the 6-image bucket, every image
    every epoch, and the summary says so; one process with batch 4 plans the same."""
    mixed_folder(tmp_path, 12)  # buckets of 3, 3 and 6 images
    ranks = [build_dataset(tmp_path, 192, 2, rank=r, world_size=2) for r in range(2)]
    single = build_dataset(tmp_path, 192, 4)
    for epoch in range(2):
        plans = [r.batches_for_epoch(epoch) for r in ranks]
        seen = [i for plan in plans for batch in plan for i, _, _ in batch]
        assert sorted(seen) == list(range(12))
        assert [a + b for a, b in zip(*plans, strict=True)] == single.batches_for_epoch(epoch)
    merged = ranks[0].summary()["merged_buckets"]
    assert len(merged) == 2 and all(v.startswith("3 images trained in bucket ") for v in merged.values())
    assert len(set(ranks[0].bucket_of)) == 1 and ranks[0].summary()["buckets"] == {
        "{}x{}".format(*ranks[0].buckets[ranks[0].bucket_of[0]]): 12}


# ---------------------------------------------------------------------------------------------------- webdataset


def write_shard(path, items):
    with tarfile.open(path, "w") as tar:
        for key, size, caption in items:
            buffer = io.BytesIO()
            gradient(*size).save(buffer, format="PNG")
            members = {f"{key}.png": buffer.getvalue()}
            if caption is not None:
                members[f"{key}.txt"] = caption.encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    sizes = [(200, 100), (150, 150), (90, 180)]
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "part-0.tar", [(f"a{i}", sizes[i % 3], f"caption a{i}") for i in range(7)])
    write_shard(folder / "part-1.tar", [(f"b{i}", sizes[i % 3], None if i == 0 else f"b{i}") for i in range(5)])
    return folder


def all_keys(batches):
    keys = []
    for batch in batches:
        assert batch["pixel_values"].shape[2:] == tuple(batch["target_size"][0].tolist())
        assert len({tuple(s) for s in batch["target_size"].tolist()}) == 1
        keys += batch["keys"]
    return keys


def test_webdataset_shards(shards, caplog):
    expected = sorted([f"part-0.tar/a{i}" for i in range(7)] + [f"part-1.tar/b{i}" for i in range(5)])
    dataset = build_dataset(shards, 192, 2, shuffle_buffer=4, seed=5)
    assert isinstance(dataset, ShardDataset)
    epoch0 = list(dataset.iter_epoch(0))
    assert sorted(all_keys(epoch0)) == expected
    assert "no caption: part-1.tar/b0" in caplog.text
    assert sorted(all_keys(dataset.iter_epoch(0, num_workers=2))) == expected
    assert_same_batches(epoch0, list(dataset.iter_epoch(0)))
    assert_same_batches(epoch0[2:], list(dataset.iter_epoch(0, start=2)))
    pattern = build_dataset(str(shards / "part-{0..1}.tar"), 192, 2)
    assert pattern.shards == [str(shards / "part-0.tar"), str(shards / "part-1.tar")]

    for world_size in (2, 3):  # 2: a shard per rank; 3: more ranks than shards, split sample by sample
        ranks = [build_dataset(shards, 192, 2, rank=r, world_size=world_size) for r in range(world_size)]
        per_rank = [all_keys(rank.iter_epoch(1)) for rank in ranks]
        assert all(per_rank) and sorted(k for keys in per_rank for k in keys) == expected


def test_folder_is_not_mistaken_for_shards(tmp_path):
    mixed_folder(tmp_path, 4)
    assert isinstance(build_dataset(tmp_path, 192, 2), FolderDataset)
