"""Making the images of a generate_images.py run: the missing ones of the plan, in batches, into a COCO-style
folder (sampling/writer.py).

Under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set) the missing images are cut into batches in index order,
exactly as one process would, and batch k goes to rank k % WORLD_SIZE: each index is made once, by a batch
of the same composition as in a one-process run, so the files are the same bytes.

Rank 0 locks the folder first (common/lock.py: a second run on it stops before reading or writing it) and keeps
its captions.json (sampling/captions.py): its own images as their groups complete, every rank's at the end.
"""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from common.cli import print_error
from common.errors import FolderInUse, SettingsMismatch
from common.files import remove_stale_temporaries
from common.lock import lock_run_folder
from common.runtime import DTYPES, World
from diffusion.compile import compile_blocks
from diffusion.prompt_limits import cut_note
from sampling.captions import Captions
from sampling.config import run_settings
from sampling.inference import ImageGenerator
from sampling.writer import is_complete, metadata, missing_jobs, write_group


def generate(args: argparse.Namespace, world: World, lora_files: list[tuple[str, float]]) -> int:
    """Fill the missing images of `args.jobs` into args.output_dir with the LoRA files `(path, scale)`;
    returns the exit status. The folder is locked for the whole run (rank 0 holds it, common/lock.py): a second
    run on it stops before it reads or writes anything there."""
    try:
        lock = lock_run_folder(args.output_dir, "output-dir", world)
    except FolderInUse as e:
        return _error(str(e), world.rank)
    try:
        return _generate(args, world, lora_files)
    finally:  # any exit; a killed process's lock goes with it
        if lock is not None:
            lock.release()


def _generate(args: argparse.Namespace, world: World, lora_files: list[tuple[str, float]]) -> int:
    out, settings, rank = args.output_dir, run_settings(args), world.rank
    try:  # rank 0 reads the folder before anyone writes: every rank then plans from the same state
        check = (missing_jobs(out, args.jobs, settings, args.overwrite), None) if world.main else None
    except SettingsMismatch as e:
        check = (None, str(e))
    missing, problem = world.broadcast(check)
    if problem:
        return _error(problem, rank)
    todo = {job.index for job in missing}
    # captions.json (rank 0): the complete groups on disk, less those about to be remade (sampling/captions.py)
    captions = Captions(out, leave_out=todo) if world.main else None
    if not missing:
        if rank == 0:
            captions.write(force=True)  # e.g. after a run killed before it could list its last images
            print(f"nothing to do: all {len(args.jobs)} images are already in {out} (--overwrite remakes them)")
        return 0

    try:
        gen = ImageGenerator.from_pretrained(args.pretrained_model, args.vae_model, lora_files, args.device,
                                            DTYPES[args.precision])
    except (OSError, ValueError) as e:
        return _error(str(e), rank)
    if args.compile:
        compile_blocks(gen.family.blocks(gen.denoiser))
    if rank == 0:  # once per run: prompts longer than the text encoder reads
        texts = {}  # each prompt (and negative prompt) once, named by its first image
        for j in missing:
            texts.setdefault(j.prompt, f"image {j.index:05d}")
        for j in [j for j in missing if j.negative_prompt]:
            texts.setdefault(j.negative_prompt, f"the negative prompt of image {j.index:05d}")
        if note := cut_note(gen.text_encoder, list(texts), list(texts.values())):
            print(note)
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out)  # left by a run killed mid-write (kill -9); no rank writes yet
        except OSError as e:
            return _error(f"--output-dir {out}: cannot create it ({e.strerror}); choose a folder you can write to")
        captions.write(force=True)  # before any group changes: it never lists one that is not complete
    sample = {"width": args.width, "height": args.height, "steps": args.num_inference_steps,
              "guidance_scale": args.guidance_scale, "sampler": args.scheduler}
    if getattr(args, "true_cfg_scale", None) is not None:  # a family option (FLUX.1)
        sample["true_cfg_scale"] = args.true_cfg_scale
    # The plan's batches (a float's last bit can depend on the batch's composition), those with a missing image:
    # a re-run remakes a missing image in the same batch as an uninterrupted run, so with the same pixels.
    planned = [args.jobs[i : i + args.batch_size] for i in range(0, len(args.jobs), args.batch_size)]
    batches = [b for b in planned if any(j.index in todo for j in b)]
    mine = batches[rank :: world.size]
    world.barrier()  # the folder exists

    start = time.perf_counter()
    bar = tqdm(total=sum(j.index in todo for b in mine for j in b), unit="img", disable=rank != 0,
               desc="generating" if world.size == 1 else f"rank 0 of {world.size}")
    with ThreadPoolExecutor(max_workers=1) as writer:  # PNG encoding and fsync overlap the next batch
        pending = []  # (job, image size, the write)
        for batch in mine:
            images = gen.generate_unique_batch([j.prompt for j in batch], [j.seed for j in batch],
                                               [j.negative_prompt for j in batch], **sample)
            for job, image in zip(batch, images, strict=True):
                if job.index in todo:  # a complete image of the batch stays as it is
                    meta = metadata(job, settings) if args.save_metadata else None
                    pending.append((job, image.size, writer.submit(write_group, out, job.index, image, job.prompt,
                                                                   meta)))
            while len(pending) > len(batch):  # at most one batch waits; a write error surfaces here
                _written(pending.pop(0), captions)
            if captions is not None:
                captions.write()
            bar.update(sum(j.index in todo for j in batch))
        for done in pending:
            _written(done, captions)
    bar.close()
    made, seconds = world.sum(sum(j.index in todo for b in mine for j in b)), time.perf_counter() - start
    if rank == 0:  # every rank's groups are on disk now (world.sum waited for them): list them all
        for job in missing:
            if job.index not in captions.entries and is_complete(out, job.index):
                captions.add(job.index, args.width, args.height, job.prompt)
        captions.write(force=True)
        rate = made / max(seconds, 1e-9)
        print(f"done: {made} image{'s' * (made != 1)} in {seconds:.1f} s ({rate:.2f} images/s on {world.size} "
              f"process{'es' * (world.size > 1)}), {len(args.jobs) - len(missing)} already there, "
              f"{len(args.jobs)} in {out}")
    return 0


def _written(done: tuple, captions: Captions | None) -> None:
    """Wait for one group's write (its error surfaces here); rank 0 then lists it in captions.json."""
    job, (width, height), future = done
    future.result()
    if captions is not None:
        captions.add(job.index, width, height, job.prompt)


def _error(message: str, rank: int = 0) -> int:
    return print_error(message) if rank == 0 else 2
