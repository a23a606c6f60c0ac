"""Memory plans for generation: the fastest of diffusers' memory mechanisms, composed, that fits a budget.

    sizes.py        what each component holds on the device under each placement (no weights read)
    activations.py  what a call allocates beyond the weights, by phase and image side (data/activations.json)
    recipes.py      the recipes, fastest first, and the diffusers calls that apply each
    plan.py         predicted peaks, the choice for a budget, and its application

```py
>>> from flux_small_encoder.memory import plan_memory
>>> plan = plan_memory(pipe, "24GiB", size=1024)   # pipe: a FluxPipeline as loaded, on the CPU
>>> print(plan.recipe.name, plan.calls())
>>> plan.apply(pipe)
```
"""

from .activations import ActivationEntry, ActivationTable
from .plan import MemoryBudgetError, MemoryPlan, Prediction, parse_budget, plan_memory, predict
from .recipes import RECIPES, Placement, Recipe, get_recipe
from .sizes import ComponentFootprint, PipelineFootprint, folder_footprint, module_footprint, pipeline_footprint

__all__ = [
    "RECIPES",
    "ActivationEntry",
    "ActivationTable",
    "ComponentFootprint",
    "MemoryBudgetError",
    "MemoryPlan",
    "PipelineFootprint",
    "Placement",
    "Prediction",
    "Recipe",
    "folder_footprint",
    "get_recipe",
    "module_footprint",
    "parse_budget",
    "pipeline_footprint",
    "plan_memory",
    "predict",
]
