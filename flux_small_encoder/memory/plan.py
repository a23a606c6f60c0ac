"""A memory plan: the fastest recipe whose predicted peak fits a budget, and how it was predicted.

A recipe's predicted peak is the largest, over the phases of a call (encode, denoise, decode), of the weights it keeps
on the device in that phase plus what the phase allocates beyond them (the activation table). Weights come from the
components' byte sizes (`sizes.py`): resident and float8 components count throughout; a streamed or offloaded one only
while its phase runs, and one at a time, since a phase's components run one after another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..messages import parse_budget
from .activations import Activation, ActivationTable, GiB
from .recipes import RECIPES, Placement, Recipe, get_recipe
from .sizes import COMPONENT_PHASES, PHASES, PipelineFootprint, pipeline_footprint


class MemoryBudgetError(ValueError):
    """No recipe fits the budget; `smallest` is the smallest budget, in bytes, that one fits."""

    def __init__(self, message: str, smallest: int):
        super().__init__(message)
        self.smallest = smallest


@dataclass(frozen=True)
class Prediction:
    """A recipe's predicted memory: bytes on the device in each phase (`phases`), `None` if it cannot apply."""

    recipe: Recipe
    phases: dict[str, int] | None
    activations: dict[str, Activation] | None = None

    @property
    def peak(self) -> int | None:
        return None if self.phases is None else max(self.phases.values())


@dataclass(frozen=True)
class MemoryPlan:
    """The recipe chosen for a budget and image side, with every recipe's prediction.

    Args:
        budget: Bytes the pipeline may allocate on the device (`None` where a recipe was asked for by name).
        size: The image side, in pixels, the plan is for.
        footprint: The components' sizes the predictions start from.
        predictions: Every recipe's prediction, fastest recipe first.
        chosen: The first prediction that fits `usable`, or the recipe asked for.
        usable: The budget less the allocator's headroom: what a prediction must fit.
        table: The activation table used.
    """

    budget: int | None
    size: int
    footprint: PipelineFootprint
    predictions: tuple[Prediction, ...]
    chosen: Prediction
    usable: int | None
    table: ActivationTable

    @property
    def recipe(self) -> Recipe:
        return self.chosen.recipe

    def calls(self, device: torch.device | str = "cuda") -> list[str]:
        """The diffusers calls that apply the chosen recipe, as a user would write them."""
        return [step.call for step in self._steps(device)]

    def apply(self, pipe, device: torch.device | str | None = None):
        """Apply the chosen recipe to `pipe` (in place) and return it.

        Args:
            pipe: The pipeline the plan was made for, with no offloading enabled yet.
            device: The accelerator to run on (default: CUDA if available, else the CPU).
        """
        from ..private_api import accelerate_offload, group_offload_config
        from ..torch_utils import default_device

        modules = [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]
        if accelerate_offload(pipe) is not None or any(group_offload_config(module) for module in modules):
            raise ValueError("the pipeline already has CPU or group offloading enabled: apply a memory plan to a "
                             "pipeline as loaded, before any offloading.")
        for step in self._steps(device or default_device()):
            step.run(pipe)
        return pipe

    @property
    def peak_activation(self) -> Activation:
        """The activation entry of the phase that sets the chosen recipe's peak."""
        phases = self.chosen.phases
        return self.chosen.activations[max(phases, key=phases.get)]

    @property
    def measured(self) -> bool:
        """Whether the peak phase's activation figure comes from a GPU reading (measured or derived), at a tabled
        image side."""
        activation = self.peak_activation
        return activation.entry.status != "estimated" and activation.scale == 1.0

    def _steps(self, device):
        footprint = self.footprint
        return self.recipe.steps(list(footprint.components), footprint.encoder, device, footprint.dtype,
                                 footprint.tile_setting)


def predict(footprint: PipelineFootprint, recipe: Recipe, table: ActivationTable, size: int) -> Prediction:
    """Bytes on the device in each phase of a call at `size` pixels under `recipe`."""
    phases, activations = {}, {}
    for phase in PHASES:
        resident, transient = 0, 0
        for name, component in footprint.components.items():
            placement = recipe.placement(name, footprint.encoder)
            running = COMPONENT_PHASES.get(name, phase) == phase
            if placement is Placement.RESIDENT:
                resident += component.resident
            elif placement is Placement.FLOAT8:
                if component.float8 is None:
                    return Prediction(recipe, None)  # this component cannot be stored in float8
                resident += component.float8
            elif running:
                held = component.streamed if placement is Placement.STREAMED else component.resident
                transient = max(transient, held)
        tiled = phase == "decode" and recipe.tiled_decode and size > footprint.tile_side
        activations[phase] = table.lookup("decode_tiled" if tiled else phase, size)
        phases[phase] = resident + transient + activations[phase].bytes
    return Prediction(recipe, phases, activations)


def plan_memory(
    pipe_or_footprint,
    budget: str | int | float | None = None,
    *,
    size: int = 1024,
    table: ActivationTable | None = None,
    recipe: str | None = None,
) -> MemoryPlan:
    r"""
    Choose the fastest memory recipe whose predicted peak fits `budget` for images of `size` pixels a side.

    Recipes, fastest first (`RECIPES`): everything resident; resident with a tiled VAE decode; the T5 encoder streamed
    beside a resident transformer; the transformer stored in float8; every component streamed (group offloading);
    model CPU offload. A budget below every prediction is refused with the smallest budget that works.

    Args:
        pipe_or_footprint (`DiffusionPipeline` or `PipelineFootprint`):
            A loaded pipeline (sized from its own parameters and buffers) or a footprint from `folder_footprint`.
        budget (`str`, `int` or `float`):
            What the pipeline may allocate on the device: GiB as a number, or a string with its unit (`"24GiB"`).
        size (`int`, *optional*, defaults to 1024):
            The image side, in pixels (the larger of height and width), the plan is for; a plan for one side serves
            every smaller one.
        table (`ActivationTable`, *optional*):
            The activation figures; default: the table shipped in the package.
        recipe (`str`, *optional*):
            A recipe to plan by name (`RECIPES`) instead of choosing by budget: its prediction, whatever it needs.

    Raises:
        MemoryBudgetError: no recipe fits; its message and `smallest` give the smallest budget that works.

    Example:
    ```py
    >>> plan = plan_memory(pipe, "24GiB", size=1024)
    >>> plan.recipe.name, plan.calls()
    >>> plan.apply(pipe)
    ```
    """
    footprint = pipe_or_footprint
    if not isinstance(footprint, PipelineFootprint):
        footprint = pipeline_footprint(pipe_or_footprint)
    if size < 1:
        raise ValueError(f"size={size}: the image side must be at least one pixel.")
    table = table or ActivationTable.load()
    if budget is None and recipe is None:
        raise ValueError("plan_memory needs a memory budget, or a recipe to plan by name.")
    budget_bytes = None if budget is None else parse_budget(budget)
    usable = None if budget is None else int(budget_bytes * (1 - table.headroom))
    predictions = tuple(predict(footprint, candidate, table, size) for candidate in RECIPES)
    if recipe is not None:
        chosen = predictions[RECIPES.index(get_recipe(recipe))]
        if chosen.peak is None:
            raise ValueError(f"recipe {recipe} does not apply: the pipeline's transformer is no diffusers model.")
        return MemoryPlan(budget_bytes, size, footprint, predictions, chosen, usable, table)
    possible = [p for p in predictions if p.peak is not None]
    fitting = [p for p in possible if p.peak <= usable]
    if not fitting:
        least = min(possible, key=lambda p: p.peak)
        smallest = least.peak / (1 - table.headroom)
        raise MemoryBudgetError(
            f"no memory recipe fits {budget_bytes / GiB:.1f} GiB at {size} px: the smallest, {least.recipe.name}, "
            f"needs about {least.peak / GiB:.2f} GiB, so a budget of at least {_round_up(smallest):.1f} GiB "
            f"(sizes from {footprint.source}).",
            smallest=int(smallest),
        )
    return MemoryPlan(budget_bytes, size, footprint, predictions, fitting[0], usable, table)


def _round_up(nbytes: float) -> float:
    """GiB rounded up to the tenth."""
    return -(-nbytes * 10 // GiB) / 10
