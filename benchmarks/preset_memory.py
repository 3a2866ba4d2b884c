"""Peak memory of a training preset: runs a train_sdxl.py command, then prints, from its metrics.jsonl, the
peak memory of its training steps (CUDA: peak allocated tensor memory since training began, the caches built
before excluded; CPU: peak resident memory) and its steps/s, as a table.

    python benchmarks/preset_memory.py OUT python train_sdxl.py --config configs/sdxl_lora_1024_24gb.yaml \\
        --pretrained_model /tmp/sdxl-random --data_dir /tmp/jpegs --output_dir OUT --max_train_steps 2
"""

import json
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: preset_memory.py OUTPUT_DIR COMMAND...", file=sys.stderr)
        return 2
    output_dir, command = Path(argv[0]), argv[1:]
    rc = subprocess.call(command)
    if rc:
        return rc
    steps = [m for m in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    if not steps:
        print(f"error: {output_dir / 'metrics.jsonl'} holds no training step", file=sys.stderr)
        return 1
    print("| preset | peak MiB (no peer run) | images/s, last step | steps |")
    print("|---|---|---|---|")
    print(f"| {output_dir.name} | {max(m['peak_mem_mib'] for m in steps):.0f} | {steps[-1]['samples_per_s']:.2f} | "
          f"{len(steps)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
