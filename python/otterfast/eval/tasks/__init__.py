"""The benchmark registry: task name -> Task."""

from __future__ import annotations

from .base import Task, TaskError
from .magnifierbench import MagnifierBench
from .mathvista import MathVista
from .mmbench import MMBench
from .mme import MME
from .mmvet import MMVet
from .pope import POPE
from .scienceqa import ScienceQA
from .seedbench import SEEDBench

TASKS: dict[str, type[Task]] = {t.name: t for t in (MME, POPE, MMBench, SEEDBench, ScienceQA, MathVista, MMVet,
                                                    MagnifierBench)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid: {sorted(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Task", "TaskError", "get_task"]
