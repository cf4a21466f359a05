"""`python -m xmoe ...` runs the trainer CLI.

A `train` process ends with `os._exit` once the CLI has finished (process group torn
down, metrics and checkpoints closed, output flushed), skipping the interpreter's
finalization. There, torch (2.13, gloo) can destroy process-group state that DeepSpeed
still references after Python is gone and abort the rank with SIGABRT ("terminate called
without an active exception") after a run that completed: seen on a two-node torchrun
job in CI, which Slurm then records as FAILED. The exit code is the CLI's own (0, 2 for
bad input, the requeue code, ...); an unexpected exception still ends the usual way.
"""

import os
import sys

from xmoe.cli import main


def run() -> None:
    try:
        main()
    except SystemExit as done:
        if sys.argv[1:2] != ["train"]:
            raise
        code = done.code
    else:  # pragma: no cover - click's main always exits
        code = 0
    if isinstance(code, str):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
