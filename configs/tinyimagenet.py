"""Tiny-ImageNet, 20 tasks of 10 classes, 64x64 (paper Tables C/D; docs/algorithm.md §1-3):
ResNet-32 and the CIFAR schedule, the 64x64 generator. Prepare it offline from the official
zip: python -m abd_jax.prepare_data --dataset=tiny_imagenet --manual_dir=<folder with
tiny-imagenet-200.zip>."""
from configs import cifar100


def get_config():
    c = cifar100.get_config()
    c.dataset = "tiny_imagenet"
    c.num_tasks = 20
    return c
