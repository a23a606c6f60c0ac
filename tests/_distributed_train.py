"""Run by `test_two_processes_match_one` under torchrun: train, then dump each rank's student for comparison."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from flux_small_encoder.training import DistillationTrainer, load_config

if __name__ == "__main__":
    output_dir = Path(sys.argv[1])
    trainer = DistillationTrainer(load_config("tiny", [f"output_dir={output_dir}", *sys.argv[2:]]))
    trainer.setup()
    assert trainer.accelerator.num_processes == 2, "expected two processes"
    trainer.train()
    student = trainer.accelerator.unwrap_model(trainer.student)
    state = {key: value.detach().clone() for key, value in student.state_dict().items()}
    save_file(state, output_dir / f"rank{trainer.accelerator.process_index}.safetensors")
    trainer.cleanup()
