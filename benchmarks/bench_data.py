"""Benchmark: how many training images per second the data path delivers (decode, resize, bucket crop, flip,
collate) at SDXL size, from a folder of full-size JPEGs, against what a GPU consumes.

One H100 trains SDXL at 1024 px, batch 4, at roughly 2.5 optimizer steps/s with our loop, i.e. ~10 images/s;
the loader must deliver more than that or the GPU waits. This times the loop's own data path
(`training.data.datasets.build_dataset`: `open_rgb`, `make_example`, `collate`, uint8 pixels) for num_workers 0, 2, 4
and several DataLoader settings: torch's defaults with a new DataLoader each epoch; the loop's
(`FolderDataset.epochs`: one DataLoader for the run, persistent workers, memory pinned where CUDA is present);
the loop's with a deeper prefetch. Each runs two epochs: "start s" is the wait for the first batch, "images/s"
counts everything after it, the second epoch included (so a new DataLoader pays for starting its workers
again). The JPEGs are made once (smooth random images, 3000x2000 like a phone photo, quality 90) in --data_dir.

    python benchmarks/bench_data.py                                  # 64 images at 1024 px, batch 4
    python benchmarks/bench_data.py --workers 0 2 4 8 --num_images 128 --threads 1
    python benchmarks/bench_data.py --smoke                          # a few small images: checks it runs
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.files import atomic_write  # noqa: E402
from training.data.datasets import build_dataset  # noqa: E402

GPU_IMAGES_PER_S = 10.0  # one H100 at 1024 px, batch 4 (see the docstring)
SMOKE = ["--num_images", "6", "--size", "96x64", "--resolution", "64", "--batch_size", "2", "--workers", "0", "1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path,
                   help="folder of the test JPEGs, made on first use (default: one per size in the temp folder)")
    p.add_argument("--num_images", type=int, default=64, help="JPEGs in the folder")
    p.add_argument("--size", default="3000x2000", help="their width x height")
    p.add_argument("--image_size", "--resolution", dest="resolution", metavar="PX", type=int, default=1024,
                   help="training resolution (bucket area)")
    p.add_argument("--batch_size", type=int, default=4, help="images per batch")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="num_workers values to try")
    p.add_argument("--prefetch", type=int, default=4, help="prefetch_factor of the deeper setting (torch's is 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the main process; 0 = torch's default")
    p.add_argument("--smoke", action="store_true", help=f"tiny settings to check it runs: {' '.join(SMOKE)}")
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args([*SMOKE, *(argv if argv is not None else sys.argv[1:])])
    args.width, args.height = map(int, args.size.lower().split("x"))
    if args.data_dir is None:
        args.data_dir = Path(tempfile.gettempdir()) / f"sdxl-lora-bench-jpegs-{args.width}x{args.height}"
    return args


def make_jpegs(folder: Path, n: int, width: int, height: int) -> None:
    """Smooth random images (they compress like photos, unlike white noise), deterministic, with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (max(1, height // 50), max(1, width // 50), 3), dtype=np.uint8)
        path = folder / f"{i:04d}.jpg"
        if path.is_file():
            continue
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="JPEG", quality=90))
        atomic_write(path.with_suffix(".txt"), lambda tmp, i=i: tmp.write_text(f"a photo number {i}"))


def loader_rate(iter_epoch) -> tuple[float, float]:
    """(seconds to the first batch, images/s after it) over epochs 0 and 1 of `iter_epoch(epoch)`."""
    start = time.perf_counter()
    batches = iter_epoch(0)
    next(batches)
    first = time.perf_counter()
    count = sum(batch["pixel_values"].shape[0] for batch in batches)
    count += sum(batch["pixel_values"].shape[0] for batch in iter_epoch(1))
    return first - start, count / (time.perf_counter() - first)


def settings(dataset, workers: list[int], prefetch: int, pin: bool):
    """(label cells, iter_epoch) for each setting: torch's defaults with a DataLoader per epoch, then (with
    workers) the training loop's `epochs` (one persistent DataLoader, pinned on CUDA), and that with `prefetch`."""
    for w in workers:
        yield (w, False, False, 2 if w else "-"), lambda epoch, w=w: dataset.iter_epoch(epoch, 0, w)
        if w > 0:
            yield (w, pin, True, 2), dataset.epochs(w, pin_memory=pin)
            yield (w, pin, True, prefetch), dataset.epochs(w, pin_memory=pin, prefetch_factor=prefetch)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    make_jpegs(args.data_dir, args.num_images, args.width, args.height)
    dataset = build_dataset(args.data_dir, args.resolution, args.batch_size, random_flip=True)
    pin = torch.cuda.is_available()  # pinning needs an accelerator; without one torch only warns
    cpu = platform.processor() or platform.machine()
    print(f"# data path, {args.num_images} JPEGs {args.width}x{args.height} -> {args.resolution} px buckets, batch "
          f"{args.batch_size}, {os.cpu_count()} CPUs ({cpu}), {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"| num_workers | pin_memory | persistent | prefetch | start s | images/s "
          f"| x GPU need ({GPU_IMAGES_PER_S:g}/s) |")
    print("|---|---|---|---|---|---|---|")
    for cells, iter_epoch in settings(dataset, args.workers, args.prefetch, pin):
        start_s, rate = loader_rate(iter_epoch)
        del iter_epoch  # ends a persistent loader's workers before the next setting starts its own
        print(f"| {' | '.join(map(str, cells))} | {start_s:.2f} | {rate:.1f} | {rate / GPU_IMAGES_PER_S:.2f} |")


if __name__ == "__main__":
    main()
