"""What a run reports: `output_dir/metrics.jsonl` (one JSON object per line) and, optionally, W&B.

W&B follows its own environment variables: `WANDB_MODE=offline` writes the run under
`output_dir/wandb/offline-run-*/` without an account or network (upload later with `wandb sync DIR`).
"""

import json
from pathlib import Path

from common.errors import WriteError
from common.files import reason_of


class MetricsLog:
    """Appends JSON lines to metrics.jsonl (flushed per line) and mirrors them to W&B when enabled."""

    def __init__(self, output_dir: Path, wandb_project: str | None = None, wandb_run_name: str | None = None,
                 config: dict | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        try:
            self.file = self.path.open("a")
        except OSError as e:
            raise WriteError(f"cannot open {self.path} for writing: {reason_of(e)}") from e
        self.wandb = None
        if wandb_project:
            import wandb

            try:
                self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=config,
                                        dir=str(output_dir))
            except wandb.errors.Error as e:  # e.g. no API key: a message to act on, not a traceback
                self.file.close()
                raise ValueError(f"--wandb_project {wandb_project}: W&B could not start a run ({e}); run "
                                 "`wandb login`, or set WANDB_MODE=offline to log into output_dir/wandb/, "
                                 "or leave --wandb_project out") from e

    def log(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record, sort_keys=True) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: one line naming the file (a cut-off line is dropped on resume)
            raise WriteError(f"cannot append to {self.path}: {reason_of(e)}") from e
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_image(self, step: int, name: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
