"""The trainers' command line (`train_sdxl.py`, `train_sd3.py`, `train_flux.py` are this with their family): parse
and check the flags, run the training, and answer every way it can end with one line and an exit status.

Exit status: 0 done (or a finished run resumed: nothing to do); 1 the run could not go on (e.g. non-finite steps);
2 bad input or a failed write (one line `error: ...`); 130 / 143 / 129 stopped by Ctrl-C / SIGTERM / SIGHUP after a
checkpoint (or before training started: nothing to save).
"""

import os
import sys

from common.console import quiet_libraries
from training.config import SCRIPTS, parse_or_exit


def main(argv=None, family: str = "sdxl") -> int:
    quiet_libraries()  # before the checks import transformers and diffusers; --verbose turns them back on
    args = parse_or_exit(argv, family)
    quiet_libraries(args.verbose)
    from common.cli import print_error, signal_name  # here, so that --help and flag errors answer before torch imports
    from common.errors import (
        AlreadyFinished,
        DataError,
        FolderInUse,
        Stopped,
        TrainingError,
        WriteError,
        interrupt_status,
    )
    from training.flags import Settings
    from training.loop.train import train
    from training.run.checkpoints import what_is_intact

    script = SCRIPTS[family][0]
    try:
        summary = train(Settings.of(args), family)
    except WriteError as e:  # a full disk, no permission: what failed, what is intact
        return print_error(f"{e}; {what_is_intact(args.output_dir)}")
    except KeyboardInterrupt as e:  # before the loop (which saves a checkpoint first); SIGTERM/SIGHUP too (run_script)
        print(f"interrupted ({signal_name(e)}); {what_is_intact(args.output_dir).split(';')[0]}", file=sys.stderr)
        return interrupt_status(e)
    except AlreadyFinished as e:
        if os.environ.get("RANK", "0") == "0":
            print(e)
        return 0
    except Stopped as e:
        print(f"{e}\ncontinue with: python {script} --config {args.output_dir}/config.yaml --resume_from latest",
              file=sys.stderr)
        return e.exit_code
    except FolderInUse as e:  # another run holds --output_dir: rank 0 says who
        return print_error(str(e)) if os.environ.get("RANK", "0") == "0" else 2
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print("done: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0
