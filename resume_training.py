"""Inspect a run's training checkpoints, find the latest one, and resume from it.

    python resume_training.py --inspect outputs/tiny_demo                          # its latest checkpoint
    python resume_training.py --inspect outputs/tiny_demo/checkpoints/step_000045
    python resume_training.py --find-latest outputs/tiny_demo                      # prints the folder's path
    python resume_training.py --auto outputs/tiny_demo                             # ... and the resume command
    python resume_training.py --auto outputs/tiny_demo --execute                   # runs that command
    python resume_training.py --auto outputs/tiny_demo --execute -- --max_train_steps 180   # train further

"Latest" is the newest complete checkpoint that loads (damaged ones are skipped with a warning), the
same one `train_sdxl.py --resume_from latest` picks. The resume command is
`python train_sdxl.py --config CKPT/config.yaml --resume_from CKPT`: the checkpoint's config.yaml is the
run's full resolved config. Flags after `--` are added to it (only those that may change on resume:
--max_train_steps, saving, validation, logging). `--execute` replaces this process with the trainer,
so signals (Ctrl-C, SIGTERM) reach it directly and its exit status is this command's.

Exit status: 0 done; 1 the run folder has no complete checkpoint yet (nothing to resume: start it with
`python train_sdxl.py --config OUTPUT_DIR/config.yaml`); 2 a path that is not a run folder or one of
our checkpoints (one line `error: ...` on stderr); with --execute, the trainer's own status.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from common.cli import Parser, add_verbose, run_script
from common.console import quiet_libraries
from common.errors import CheckpointError, NoCheckpoint


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="resume_training.py", description=__doc__.splitlines()[0],
               epilog="Flags after `--` go to train_sdxl.py (with --auto).")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--inspect", metavar="PATH", help="print step, epoch, last loss, the run's settings and the "
                      "files of a checkpoint folder, or of a run folder's latest checkpoint")
    mode.add_argument("--find-latest", dest="find_latest", metavar="DIR", help="print the path of the newest "
                      "complete checkpoint of a run folder (--output_dir, or its checkpoints/ folder)")
    mode.add_argument("--auto", metavar="DIR", help="print a run folder's latest checkpoint and the exact command "
                      "that resumes it")
    p.add_argument("--execute", action="store_true", help="with --auto: run that command (this process becomes "
                   "the trainer; its exit status is returned)")
    add_verbose(p)  # this process's; the trainer's own --verbose goes after --
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.execute or extra) and not args.auto:
        parser.error("--execute and flags after -- go with --auto DIR")
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")  # damaged checkpoints skipped
    quiet_libraries(args.verbose)
    # here, after parsing: --help and flag errors answer before torch imports
    from training.run.folder import (
        check_extra,
        describe,
        finished,
        latest_checkpoint,
        open_checkpoint,
        resume_command,
        script_path,
        shell,
    )

    try:
        if args.inspect:
            print(describe(open_checkpoint(args.inspect)))
        elif args.find_latest:
            print(latest_checkpoint(args.find_latest).path)
        else:
            checkpoint = latest_checkpoint(args.auto)
            cmd = resume_command(checkpoint, python=sys.executable if args.execute else None, extra=extra)
            check_extra(checkpoint, cmd)
            print(f"latest checkpoint: {checkpoint.path} (step {checkpoint.state['step']})")
            print(f"resume with: {shell(cmd)}")
            if finished(checkpoint, extra):
                steps = checkpoint.state["step"]
                again = shell(["python", script_path(Path(__file__).resolve()), "--auto", args.auto, "--execute", "--",
                               "--max_train_steps", str(2 * steps)])
                print(f"note: the run already reached its max_train_steps {steps}, so resuming says so and changes "
                      f"nothing; to train on, e.g. to {2 * steps} steps: {again}")
            if args.execute:
                sys.stdout.flush()
                sys.stderr.flush()
                os.execv(sys.executable, cmd)  # never returns
    except NoCheckpoint as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_script(main)
