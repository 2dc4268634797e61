"""ImageNet-100 under the exemplar-free papers' warm start: a first task of 50 classes, then 5
equal steps of 10 (first_task_classes=50, num_tasks=6); --config.num_tasks=11 gives 10 steps
of 5. The class order is numpy's seed-1993 order in every repeat; everything else is
configs/imagenet100.py's.
"""
from configs import imagenet100


def get_config():
    c = imagenet100.get_config()
    c.first_task_classes = 50
    c.num_tasks = 6
    c.class_order = "1993"  # iCaRL's / PyCIL's, the same in every repeat
    return c
