"""Where a run executes: the device and precision its flags ask for, and the torchrun world it belongs to.

Both `train_sdxl.py` and `generate_images.py` resolve `--device` / `--precision` with `resolve_device` and
join torchrun's process group with `init_world` (NCCL on GPUs, gloo on CPUs so tests run anywhere; one
process per GPU, each on cuda:LOCAL_RANK). Multi-node runs use torchrun's own rendezvous
(`torchrun --nnodes N --rdzv_endpoint HOST:PORT ...`); nothing here re-invents it.

A broken torchrun environment is one line naming the variable, never a traceback or a hang: RANK,
WORLD_SIZE and LOCAL_RANK must be whole numbers with RANK < WORLD_SIZE, MASTER_ADDR/MASTER_PORT set; and
the process group must start within SDXL_LORA_START_TIMEOUT seconds (default 300), else every process
that is waiting says which were missing and exits with status 2 (e.g. WORLD_SIZE=2 with one process).
"""

import os
import re
import sys
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from common.cli import fail
from common.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
START_TIMEOUT_VARIABLE, START_TIMEOUT_S = "SDXL_LORA_START_TIMEOUT", 300.0
HINT = "launch with torchrun, which sets it, or unset it for one process"


def _variable(name: str, default: str) -> int:
    text = os.environ.get(name, default)
    if not text.strip().isdigit():
        raise ConfigError(f"environment variable {name}={text!r} is not a whole number >= 0; {HINT}")
    return int(text)


def torchrun_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from torchrun's environment, (0, 1, 0) without it; a ConfigError naming a
    variable that is not a number or out of range."""
    rank, size, local_rank = _variable("RANK", "0"), _variable("WORLD_SIZE", "1"), _variable("LOCAL_RANK", "0")
    if size < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={size} must be >= 1; {HINT}")
    if rank >= size:
        raise ConfigError(f"environment variable RANK={rank} must be below WORLD_SIZE={size}; {HINT}")
    if local_rank >= size:
        raise ConfigError(f"environment variable LOCAL_RANK={local_rank} must be below WORLD_SIZE={size}; {HINT}")
    for name in ("MASTER_ADDR", "MASTER_PORT") if size > 1 else ():
        if not os.environ.get(name):
            raise ConfigError(f"environment variable {name} is not set but WORLD_SIZE={size}; {HINT}")
    if size > 1 and not os.environ["MASTER_PORT"].isdigit():
        raise ConfigError(f"environment variable MASTER_PORT={os.environ['MASTER_PORT']!r} is not a port number; "
                          f"{HINT}")
    return rank, size, local_rank


def torchrun_world_size() -> int:
    return torchrun_env()[1]


def start_timeout() -> float:
    """Seconds the process group may take to start (SDXL_LORA_START_TIMEOUT, default 300)."""
    text = os.environ.get(START_TIMEOUT_VARIABLE, str(START_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"environment variable {START_TIMEOUT_VARIABLE}={text!r} must be a number of seconds > 0, "
                          f"e.g. {START_TIMEOUT_S:g}")
    return seconds


def resolve_device(device: str, precision: str) -> tuple[str, str]:
    """(device, precision) for the flags' values, or a ConfigError naming the flag.

    device: auto (cuda if torch sees one, else cpu), cpu, cuda, cuda:N; under torchrun a GPU run uses
    cuda:LOCAL_RANK, so only cuda/auto are accepted there. precision: auto = bf16 on a GPU (fp16 where bf16
    is unsupported), fp32 on a CPU; fp16 needs a GPU."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        fail("device", device, "must be auto, cpu, cuda or cuda:N")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            fail("device", device, "no CUDA GPU is visible to torch; use --device cpu (or auto)")
        if torchrun_world_size() > 1:
            if device != "cuda":
                fail("device", device, "under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda (or auto)")
            device = f"cuda:{torchrun_env()[2]}"
        if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
            fail("device", device, f"only {torch.cuda.device_count()} CUDA device(s) are visible; use a lower index")
    if precision == "auto":
        precision = "fp32" if device == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu" and precision == "fp16":
        fail("precision", "fp16", "fp16 needs a CUDA GPU; on CPU use --precision fp32 or bf16")
    if device != "cpu" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        fail("precision", "bf16", f"{device} does not support bf16; use --precision fp16 (with a fp16-fix VAE if the "
             "VAE overflows) or fp32")
    return device, precision


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors in place over the ranks; a no-op in one process."""
        if self.size > 1:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(self.size)

    def any(self, flag: bool) -> bool:
        """True if `flag` is true on any rank (so that every rank stops at the same step)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, n: int) -> int:
        """The sum of `n` over the ranks."""
        if self.size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        if self.size == 1:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: str) -> World:
    """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK) when there is one; `device` is the
    resolved device of this rank (see `resolve_device`). A bad environment is a ConfigError; a group that does
    not start within `start_timeout()` ends the process with a one-line error (status 2). On a GPU, fp32
    matmuls and convolutions may use TF32."""
    if device.startswith("cuda"):  # TF32 for the fp32 parts (VAE, LoRA branches) on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rank, size, _ = torchrun_env()
    if size == 1:
        return World(device=torch.device(device))
    timeout = start_timeout()
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        where = f"MASTER_ADDR:MASTER_PORT {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        watchdog = threading.Timer(timeout, _give_up, (f"the torchrun process group did not start within "
                                   f"{timeout:g} s (RANK {rank} of WORLD_SIZE {size}, {where}): not every process "
                                   f"joined; start all {size} processes (torchrun --nproc_per_node/--nnodes), check "
                                   f"the address, or raise {START_TIMEOUT_VARIABLE} (seconds)",))
        watchdog.daemon = True
        watchdog.start()
        try:
            if device.startswith("cuda"):
                dist.init_process_group("nccl", device_id=torch.device(device))
            else:
                dist.init_process_group("gloo")
        except (RuntimeError, ValueError) as e:  # e.g. the port is taken: DistNetworkError
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"the torchrun process group cannot start ({reason}); check {where}") from e
        finally:
            watchdog.cancel()
    return World(dist.get_rank(), size, torch.device(device))


def _give_up(message: str) -> None:
    """The start-up watchdog: init_process_group blocks in C++ and cannot be interrupted, so leave at once."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
