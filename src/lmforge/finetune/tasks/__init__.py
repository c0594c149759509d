"""The fine-tuning tasks: one `Task` class per module, registered by name in `TASKS`.

Defining a `Task` subclass with a `name` registers it (`Task.__init_subclass__`, which also refuses a task that
leaves part of the surface unimplemented); importing this package imports every module in it, so a new task is
one new module here and nothing else in the recipe names a task. `TASKS` keeps the order the tasks were defined
in, the order `--task` lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from lmforge.finetune.tasks.base import TASKS, Task

if TYPE_CHECKING:
    from lmforge.data.tokenizers.tokenizer import Tokenizer
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.finetune.datasets import TaskData

__all__ = ["TASKS", "Task", "build_task"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")


def build_task(config: FinetuneConfig, tokenizer: Tokenizer, data: TaskData) -> Task:
    """The task object of `config.task.task`; labels and tags come from the training records."""
    return TASKS[config.task.task].from_data(config, tokenizer, data)
