"""CIFAR-100 under the exemplar-free papers' warm start: a first task of 50 classes, then 5
equal steps of 10 ("B50, 5 steps" = first_task_classes=50, num_tasks=6). The other points of
the field's grid:

    --config.num_tasks=11                              B50, 10 steps of 5
    --config.first_task_classes=40 --config.num_tasks=21   B40, 20 steps of 3

The class order is iCaRL's / PyCIL's (numpy's seed 1993), the same in every repeat, so the
repeats vary only the training seed. Everything else is configs/cifar100.py's (ABD's
recipe).
"""
from configs import cifar100


def get_config():
    c = cifar100.get_config()
    c.first_task_classes = 50
    c.num_tasks = 6
    c.class_order = "1993"  # iCaRL's / PyCIL's, the same in every repeat
    return c
