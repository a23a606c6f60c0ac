"""Run by `test_checkpoints_of_two_processes_need_no_shared_disk_and_a_failure_stops_both` under torchrun.

Rank 1 cannot write at all (as on a node without the main process's filesystem), and the main process's disk fills up
while it writes checkpoint-4. Each rank reports the error it stopped with in `REPORTS/rank{N}.txt`.
"""

import errno
import os
import sys
from pathlib import Path

from flux_small_encoder.training import DistillationTrainer, checkpointing, load_config, state


def cannot_write(*args, **kwargs):
    raise PermissionError("rank 1 cannot write to the main process's disk")


def fills_up_at_checkpoint_4(save_training_state):
    def save(folder, *args, **kwargs):
        if ".checkpoint-4." in str(folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save_training_state(folder, *args, **kwargs)

    return save


if __name__ == "__main__":
    output_dir, reports = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    if rank == 1:
        state.save_file = cannot_write
    else:
        checkpointing.save_training_state = fills_up_at_checkpoint_4(checkpointing.save_training_state)
    trainer = DistillationTrainer(load_config("tiny", [f"output_dir={output_dir}", *sys.argv[3:]]))
    trainer.setup()
    try:
        trainer.train()
        report = "finished"
    except Exception as error:
        report = f"{type(error).__name__}: {error}"
    finally:
        trainer.cleanup()
    (reports / f"rank{rank}.txt").write_text(report)
