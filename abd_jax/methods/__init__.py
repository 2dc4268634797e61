"""Methods: each is its losses plus task-boundary hooks with its own typed state (see
`lifecycle`), plugged into the one shared task loop (`abd_jax.runner`).

A method is found here by being a module of this package with a `Method` subclass that names
itself (`name`); its config subtrees (`sections`), the tables it is a row of and the figures
papers report for it are its class's attributes, so adding one touches its module, its
config subtree, its tests and its row of docs/methods.md. `get_method(config, spec)` builds
one by name."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

from abd_jax import data as data_lib
from abd_jax.methods.lifecycle import Loop, Method, Runtime, SGDLoop, Update
from abd_jax.methods.published import SOURCES
from abd_jax.plan import Task


def _discover() -> dict[str, type]:
    """{name: class} of every named `Method` subclass in this package's modules, in table
    order (`rank`, then name)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found, stack = {}, [Method]
    while stack:
        for cls in stack.pop().__subclasses__():
            if cls.__dict__.get("name"):
                found[cls.name] = cls
            stack.append(cls)
    return dict(sorted(found.items(), key=lambda item: (item[1].rank, item[0])))


_CLASSES: dict[str, type] = _discover()
METHODS = tuple(_CLASSES)


def get_method(config, spec: Optional[data_lib.DatasetSpec] = None) -> Method:
    """The method `config.method` for data described by `spec` (default: the registered
    `config.dataset`'s)."""
    if config.method not in _CLASSES:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)} "
                         "(e.g. --config.method=lwf)")
    return _CLASSES[config.method](config, spec or data_lib.spec_of(config))


def config_sections() -> tuple:
    """Every method's config subtrees."""
    return tuple(sorted({s for cls in _CLASSES.values() for s in cls.sections}))


def table_rows() -> dict[str, dict]:
    """{row: config overrides} of run_table.py: each method, then its variants."""
    rows = {}
    for name, cls in _CLASSES.items():
        rows[name] = {"method": name, **cls.row_settings}
        rows.update({row: {"method": name, **cls.row_settings, **over}
                     for row, over in cls.variants.items()})
    return rows


def tables() -> dict[str, list]:
    """{table: its rows in order} of run_table.py's `--table`s."""
    out: dict[str, list] = {}
    for name, cls in _CLASSES.items():
        for table in cls.tables:
            out.setdefault(table, []).append(name)
        for table in cls.variant_tables:
            out.setdefault(table, []).extend(cls.variants)
    return out


def published(dataset: str, first_task_classes: int) -> tuple[dict, dict]:
    """({row: {num_tasks: (mean, std, source key, metric)}}, {source key: text}) of the
    figures the methods list for `dataset` under this protocol."""
    figures, sources = {}, dict(SOURCES)
    for name, cls in _CLASSES.items():
        sources.update(cls.sources)
        for f in cls.published:
            if (f.dataset, f.first_task_classes) == (dataset, first_task_classes):
                figures.setdefault(name, {})[f.num_tasks] = (f.mean, f.std, f.source, f.metric)
    return figures, sources


__all__ = ["Loop", "Method", "METHODS", "Runtime", "SGDLoop", "Task", "Update", "get_method"]
