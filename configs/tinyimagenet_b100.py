"""Tiny-ImageNet under the exemplar-free papers' warm start: a first task of 100 classes, then
5 equal steps of 20 (first_task_classes=100, num_tasks=6). The other points of the field's
grid: --config.num_tasks=11 (10 steps of 10), --config.num_tasks=21 (20 steps of 5).
The class order is numpy's seed-1993 order in every repeat; everything else is
configs/tinyimagenet.py's.
"""
from configs import tinyimagenet


def get_config():
    c = tinyimagenet.get_config()
    c.first_task_classes = 100
    c.num_tasks = 6
    c.class_order = "1993"  # iCaRL's / PyCIL's, the same in every repeat
    return c
