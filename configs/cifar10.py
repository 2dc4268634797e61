"""CIFAR-10, 5 tasks of 2 classes (prepare offline with abd_jax.prepare_data, see README)."""
from configs import cifar100


def get_config():
    c = cifar100.get_config()
    c.dataset = "cifar10"
    c.num_tasks = 5
    return c
