"""Run by torchrun from tests/test_distributed.py: a tiny build whose rank 1 is killed (SIGKILL) right after
iteration KILL_AT on the job's first attempt; torchrun's restart then resumes it from the checkpoint.

Usage: torchrun ... tests/torchrun_kill_build.py RECIPE_JSON DATA_ROOT OUT_ROOT KILL_AT
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from builders import distributed
from builders.build import make_engine, recipe_from_dict


def main() -> None:
    recipe_file, data_root, out_root, kill_at = sys.argv[1:5]
    recipe = recipe_from_dict(json.loads(Path(recipe_file).read_text()))

    def die_once(done: int, loss: float) -> None:
        if done == int(kill_at) and distributed.current().rank == 1 and not distributed.restarted():
            (Path(out_root) / "killed-rank-1").write_text(str(done))
            os.kill(os.getpid(), signal.SIGKILL)

    with distributed.session(torch.device("cpu")):
        make_engine(recipe, out_root=out_root, data_root=data_root, device="cpu", evaluate=False,
                    progress=False).run(on_iteration=die_once)


if __name__ == "__main__":
    main()
