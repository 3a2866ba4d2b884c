"""Benchmark: how many training images per second the data path delivers (decode, resize, bucket crop, flip,
collate) at SDXL size, from a folder of full-size JPEGs, against what a GPU consumes.

One H100 trains SDXL at 1024 px, batch 4, at roughly 2.5 optimizer steps/s with our loop, i.e. ~10 images/s;
the loader must deliver more than that or the GPU waits. This times `FolderDataset.iter_epoch` (the loop's own
data path) for several DataLoader settings: num_workers 0, 2, 4; pinned memory; persistent workers; prefetch.
The JPEGs are made once (random smooth images, 3000x2000 like a phone photo, quality 90) in --data_dir.

    python benchmarks/bench_data.py                                  # 64 images at 1024 px, batch 4
    python benchmarks/bench_data.py --workers 0 2 4 8 --num_images 128
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.datasets import build_dataset  # noqa: E402

GPU_IMAGES_PER_S = 10.0  # one H100 at 1024 px, batch 4 (see the docstring)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=Path("/tmp/sdxl-lora-bench-jpegs"),
                   help="folder of the test JPEGs (made on first use)")
    p.add_argument("--num_images", type=int, default=64, help="JPEGs in the folder")
    p.add_argument("--size", default="3000x2000", help="their width x height")
    p.add_argument("--image_size", "--resolution", dest="resolution", metavar="PX", type=int, default=1024,
                   help="training resolution (bucket area)")
    p.add_argument("--batch_size", type=int, default=4, help="images per batch")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="num_workers values to try")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the main process; 0 = torch's default")
    return p.parse_args(argv)


def make_jpegs(folder: Path, n: int, width: int, height: int) -> None:
    """Smooth random images (they compress like photos, unlike white noise), deterministic."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"{i:04d}.jpg"
        if path.is_file():
            continue
        small = rng.integers(0, 256, (height // 50, width // 50, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        image.save(path, quality=90)
        path.with_suffix(".txt").write_text(f"a photo number {i}")


def images_per_s(dataset, workers: int, **loader_kwargs) -> float:
    """Images/s over one epoch (after the loader's first batch, so worker start-up is not counted)."""
    batches = dataset.iter_epoch(0, 0, workers, **loader_kwargs)
    next(batches)
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += batch["pixel_values"].shape[0]
    return count / (time.perf_counter() - start)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = map(int, args.size.lower().split("x"))
    make_jpegs(args.data_dir, args.num_images, width, height)
    dataset = build_dataset(args.data_dir, args.resolution, args.batch_size, random_flip=True)
    cpu = platform.processor() or platform.machine()
    print(f"# data path, {args.num_images} JPEGs {width}x{height} -> {args.resolution} px buckets, batch "
          f"{args.batch_size}, {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}")
    print("| num_workers | pin_memory | persistent | prefetch | images/s | x GPU need (10/s) |")
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        fast = {"pin_memory": True, "persistent_workers": True, "prefetch_factor": 4}
        settings = [{}] if workers == 0 else [{}, fast]
        for kw in settings:
            rate = images_per_s(dataset, workers, **kw)
            print(f"| {workers} | {kw.get('pin_memory', False)} | {kw.get('persistent_workers', False)} | "
                  f"{kw.get('prefetch_factor', 2 if workers else '-')} | {rate:.1f} | {rate / GPU_IMAGES_PER_S:.2f} |")


if __name__ == "__main__":
    main()
