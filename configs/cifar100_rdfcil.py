"""R-DFCIL on CIFAR-100 in its paper's setting (Gao et al. 2022, the release's
config/cifar100.yaml): 200 epochs per task of which the last 40 fine-tune the head at lr 0.005
(here: 160 epochs, then rdfcil.finetune_epochs = 40), lr 0.1 x0.1 at epochs 80 and 120,
weight decay 5e-4, crop + flip only, 5,000 generator iterations. Its three class orders
(`config/cifar100.yaml`, "used by ABD and our R-DFCIL") are ABD's release's orders of repeats
0, 1, 2: `class_order="release"`, inherited from configs/cifar100.py.

The network is the release's: cl-lite's ResNet-32 (`resnet32_cl_lite`, `models.
CifarResNetClLite`), with the depth, widths, stem and zero-padded shortcuts of the ResNet-32
the other configs use (`resnet32`), but no ReLU after any block's addition (the pooled
features are pre-activation), each block's last BatchNorm starting at gamma 0, Kaiming-normal
convolutions in fan-out mode, and the shortcut's zero channels after the input's (not on both
sides); and its head (`rdfcil.head = "per_task"`, the default): a bias-free Linear per task,
initialised N(0, 0.001^2).

    python -m abd_jax.main --config=configs/cifar100_rdfcil.py --workdir=runs/rdfcil \\
        --config.num_tasks=10 --config.repeats=3

For R-DFCIL under ABD's protocol (ABD's schedule, augmentation and class orders) use
configs/cifar100.py with --config.method=rdfcil.
"""
from configs import cifar100


def get_config():
    c = cifar100.get_config()
    c.method = "rdfcil"
    c.model = "resnet32_cl_lite"
    c.augment.brightness = 0.0
    c.augment.contrast = 0.0
    c.epochs = 160
    c.lr_milestones = (80, 120)
    c.weight_decay = 5e-4
    c.rdfcil.finetune_epochs = 40
    c.rdfcil.finetune_lr_scale = 0.05  # 0.005 / 0.1
    c.synthesis.iterations = 5_000
    return c
