"""Downstream tasks: one module each (reader, head, metric), sharing pipeline/tasks/common.py.

    from pipeline.tasks import get_task
    module = get_task("vqa")     # module.read_split(cfg, split), module.Task(cfg, tokenizer)
"""
from importlib import import_module

TASKS = ("vqa", "nlvr2", "retrieval")


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"task.name={name!r} must be one of {TASKS}")
    return import_module(f"pipeline.tasks.{name}")
