"""Figures the papers report for a method, shown beside the measured ones in
`run_table.py`'s tables: a method lists its own (`Method.published`), each naming its
source."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Published:
    """`mean` +- `std` (%) of `metric` ("A_N" or "A_inc") on `dataset` in `num_tasks` tasks,
    the first of `first_task_classes` classes (0: equal tasks), from `source` (a
    `SOURCES` key or one of the method's own `sources`)."""

    dataset: str
    num_tasks: int
    mean: float
    std: float
    source: str
    metric: str = "A_N"
    first_task_classes: int = 0


SOURCES = {
    "ABD": "Smith et al., ICCV 2021, Tables 1, 2 and A (docs/algorithm.md §8): ABD's protocol "
           "(ResNet-32, 250 epochs, lr 0.1 x0.1 at 100/150/200, weight decay 2e-4, "
           "10,000 generator steps after each task), the release's seeded class orders",
}


def abd_table(five: tuple, ten: tuple, twenty: tuple) -> tuple:
    """A row of ABD's CIFAR-100 tables: (mean, std) of A_N at 5, 10 and 20 equal tasks."""
    return tuple(Published("cifar100", n, mean, std, "ABD")
                 for n, (mean, std) in ((5, five), (10, ten), (20, twenty)))
