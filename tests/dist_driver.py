"""Several training runs in one multi-process launch, through prmkit's Python API (tests/test_distributed.py).

Launched with `accelerate launch ... tests/dist_driver.py SPEC.json`: every process calls
``prmkit.training.recipe.train`` once per run in SPEC (the code `prmkit train` runs), so one launch, and its start-up
cost, serves several runs. SPEC is ``{"out": DIR, "runs": [{"name", "flags", "kill_after_checkpoint"?}]}``; rank 0
writes each run's summary to DIR/NAME.json. A run with ``kill_after_checkpoint: N`` is killed with SIGKILL, every
process of the launch at once (the workers, the launcher), at the end of step N + 1, once checkpoint-N is complete:
what `kill -9` of the job leaves behind. It must be the last run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def killer(step: int, checkpoint: Path):
    import torch.distributed as dist
    from transformers import TrainerCallback

    pids: list = []

    class KillAll(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            pids.extend([None] * dist.get_world_size())
            dist.all_gather_object(pids, os.getpid())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != step + 1:
                return
            dist.barrier()  # every rank has finished the step; checkpoint-N was marked complete before it
            if state.is_world_process_zero:
                assert (checkpoint / "prmkit_checkpoint.json").is_file()
                for pid in pids:
                    if pid != os.getpid():
                        os.kill(pid, signal.SIGKILL)
                os.kill(os.getppid(), signal.SIGKILL)  # the launcher (accelerate launch runs torchrun in-process)
                os.kill(os.getpid(), signal.SIGKILL)
            signal.pause()

    return KillAll()


def main(spec_path: str) -> None:
    from prmkit.config.load import load_config
    from prmkit.scoring import end_distributed
    from prmkit.training.recipe import train

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for run in spec["runs"]:
        cfg = load_config(None, None, run["flags"])
        callbacks = []
        if run.get("kill_after_checkpoint"):
            step = int(run["kill_after_checkpoint"])
            callbacks.append(killer(step, Path(run["flags"]["train.output_dir"]) / f"checkpoint-{step}"))
        result = train(cfg, callbacks=callbacks)
        if int(os.environ.get("RANK", "0")) == 0:
            (out / f"{run['name']}.json").write_text(json.dumps(result.to_dict()))
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
