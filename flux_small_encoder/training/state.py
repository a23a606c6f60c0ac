"""The trainer's state in a checkpoint, written and read without pickle: safetensors for tensors, JSON for the rest.

    state/
      student.safetensors      every weight of the student (with LoRA, the peft model's: adapters and frozen base)
      optimizer.safetensors    AdamW's moments and step counts; its param_groups, as JSON, in the file's metadata
      rng-RANK.safetensors     each process's torch generator states (CPU, CUDA); Python's and NumPy's as JSON
                               (the main process writes them all: the others send theirs)

accelerate's `save_state` pickles the learning-rate schedule (and `load_state` unpickles it with `weights_only=False`,
which runs whatever code the file names) and the generator states. Nothing here is a pickle, and `refuse_pickles`
refuses a checkpoint that carries one. The schedule needs no file: it is a function of the config and the step, and
is rebuilt at the resumed step (`build_lr_scheduler`), so a resumed run also follows the config it was given.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from ..paths import PICKLE_SUFFIXES
from .config import TrainingConfig
from .files import DamagedFileError, safetensors_problem

logger = logging.getLogger(__name__)

STUDENT_STATE = "student.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
RNG_STATE = "rng-{rank}.safetensors"
# Files that hold (or may hold) a pickle: `torch.save` writes a zip around one, under these names or any other.
# Formats the package reads with parsers that cannot run code.
SAFE_SUFFIXES = (".safetensors", ".json", ".yaml", ".md", ".txt")


def save_training_state(folder: Path, student: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the student's weights and the optimizer's state into `folder` (the main process's part)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(student, str(folder / STUDENT_STATE), metadata={"format": "pt"})  # tied weights are written once
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "plain": json.dumps(plain)}
    save_file(tensors, folder / OPTIMIZER_STATE, metadata=metadata)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's random generator states: torch's (CPU, CUDA) as tensors, Python's and NumPy's as JSON."""
    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, position, has_gauss, gauss = np.random.get_state()
    metadata = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([name, keys.tolist(), position, has_gauss, gauss]),
    }
    return tensors, metadata


def save_rng_states(folder: Path, states: list[tuple[dict[str, torch.Tensor], dict[str, str]]]) -> None:
    """Write the generator states of every process (`rng_state()` of each, in process order) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for process_index, (tensors, metadata) in enumerate(states):
        save_file(tensors, folder / RNG_STATE.format(rank=process_index), metadata=metadata)


def load_training_state(
    folder: Path, student: nn.Module, optimizer: torch.optim.Optimizer, process_index: int
) -> None:
    """Restore the student's weights, the optimizer's state and this process's generators from `folder`.

    Raises:
        ValueError: The checkpoint's student is another model than this run's (names the first weight that differs),
        DamagedFileError: A file is damaged in a way `check_training_state` cannot see (names the file).
    """
    _load_student(folder / STUDENT_STATE, student)
    path = folder / OPTIMIZER_STATE
    try:
        _load_optimizer(path, optimizer)
        path = folder / RNG_STATE.format(rank=process_index)
        _load_rng_state(path)
    except (SafetensorError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise DamagedFileError(f"{path} is damaged ({type(error).__name__}: {' '.join(str(error).split())}): the "
                               f"checkpoint {folder.parent} cannot be resumed.") from None


def check_training_state(folder: Path) -> None:
    """Raise `DamagedFileError` naming the first file of a checkpoint's `state/` that is missing, truncated or damaged.

    Only the sizes and headers are read: the files are checked before any model loads, and their loading cannot fail
    halfway with an error that names no file.
    """
    rng_files = sorted(folder.glob(RNG_STATE.format(rank="*")))
    for path in [folder / STUDENT_STATE, folder / OPTIMIZER_STATE, folder / RNG_STATE.format(rank=0), *rng_files]:
        if problem := safetensors_problem(path):
            raise DamagedFileError(f"{path} is {problem}: the checkpoint {folder.parent} cannot be resumed.")


def apply_optimizer_config(optimizer: torch.optim.Optimizer, config: TrainingConfig) -> None:
    """Set AdamW's hyper-parameters from `config` (a resumed run follows its config, not the checkpoint's)."""
    for group in optimizer.param_groups:
        group.update(
            initial_lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, step: int = 0):
    """The diffusers schedule `config.lr_scheduler`, positioned after `step` optimizer steps.

    A fresh run starts at step 0; a resumed run rebuilds it at its step (after `apply_optimizer_config`), which gives
    the learning rate the uninterrupted run had, or the one the new config asks for.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_steps, last_epoch=step - 1,
    )


def refuse_pickles(checkpoint: Path) -> None:
    """Raise `ValueError` naming the first file of `checkpoint` that is (or may be) a pickle.

    The package writes none into a checkpoint and reads none from it: unpickling a file can run any code it names.
    """
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and _may_be_pickle(path):
            raise ValueError(
                f"{path} may be a pickle, which can run code when loaded: checkpoints of this package hold only "
                "safetensors and JSON (earlier versions pickled state/ through accelerate), so nothing was loaded. "
                f"To continue from its weights, start a new run with student_init=distilled "
                f"student={checkpoint / 'student'}."
            )


def _may_be_pickle(path: Path) -> bool:
    if path.suffix in PICKLE_SUFFIXES:
        return True
    if path.suffix in SAFE_SUFFIXES:
        return False
    with open(path, "rb") as file:
        head = file.read(4)
    # Pickle protocols 2 to 5 start with 0x80 and the protocol number; torch.save writes a zip around its pickle.
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") or head == b"PK\x03\x04"


def _load_student(path: Path, student: nn.Module) -> None:
    own = student.state_dict()
    with safe_open(path, framework="pt") as file:
        shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    differ = [key for key, shape in shapes.items() if key not in own or tuple(own[key].shape) != shape]
    if differ:
        where = f"{differ[0]} {shapes[differ[0]]} there, " + (
            f"{tuple(own[differ[0]].shape)} here" if differ[0] in own else "absent here"
        )
        raise ValueError(
            f"the checkpoint's student ({path.parent.parent}) is not this run's: {len(differ)} of its {len(shapes)} "
            f"weights differ in name or shape ({where}). Resume with the student and lora settings it was trained "
            "with."
        )
    missing, _ = load_model(student, str(path), strict=False)
    if missing:
        raise ValueError(f"the checkpoint's student ({path.parent.parent}) lacks {len(missing)} weights of this run's "
                         f"(first: {missing[0]}). Resume with the student and lora settings it was trained with.")


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
        state = {}
        for key in file.keys():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = file.get_tensor(key)
    for index, slots in json.loads(metadata["plain"]).items():
        state.setdefault(int(index), {}).update(slots)
    groups = json.loads(metadata["param_groups"])
    for saved, current in zip(groups, optimizer.param_groups, strict=True):
        saved.update({key: tuple(value) for key, value in saved.items() if isinstance(current.get(key), tuple)})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _load_rng_state(path: Path) -> None:
    import numpy as np

    if not path.is_file():  # resuming on more processes than wrote the checkpoint
        logger.warning(f"no generator state {path.name} in the checkpoint: this process's random draws (dropout) "
                       "start afresh.")
        return
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
        torch.set_rng_state(file.get_tensor("torch"))
        cuda = sorted(key for key in file.keys() if key.startswith("cuda."))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([file.get_tensor(key) for key in cuda])
    version, internal, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, gauss = json.loads(metadata["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
