"""CIFAR-10, 5 tasks of 2 classes, on a reduced schedule that finishes on a laptop CPU.

A ResNet-8 on the first 500 training images per class, 15 epochs per task, 500 generator
iterations: for checking that methods rank as in the paper, not for its numbers.
Prepare the data first: python -m abd_jax.prepare_data --dataset=cifar10 --manual_dir=...
"""
from configs import cifar10


def get_config():
    c = cifar10.get_config()
    c.model = "resnet8"
    c.train_per_class = 500
    c.batch_size = 64
    c.epochs = 15
    c.lr = 0.05
    c.lr_milestones = (10, 13)
    c.coreset.memory = 200              # 4% of the 5,000 training images, as 2,000 of CIFAR's 50,000
    c.rdfcil.finetune_epochs = 4        # a quarter of the task's epochs, as the release's 40 / 160
    c.first_task.epochs = 15            # the exemplar-free methods' first task, on this scale
    c.first_task.lr = 0.05
    c.fetril.epochs = 10
    c.lwf_ncm.epochs, c.lwf_ncm.milestones = 15, (7, 13)  # 100 and (45, 90), scaled
    c.analytic.expansion = 1024         # R: 8 MB (the official 8192: 512 MB)
    c.synthesis.iterations = 500
    c.synthesis.log_every = 100
    c.synthesis.checkpoint_every = 200
    c.log_every_steps = 50
    c.checkpoint_every_steps = 200
    return c
