"""ImageNet-50 (docs/algorithm.md §1, the authors' later variant): the first 50 classes of the
seed-1993 class order in 5 tasks of 10, with configs/imagenet.py's ResNet-18 schedule."""
from configs import imagenet


def get_config():
    c = imagenet.get_config()
    c.num_classes = 50         # the first 50 classes of the class order; the head has 50
    c.num_tasks = 5
    return c
