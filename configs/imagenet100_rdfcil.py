"""R-DFCIL on ImageNet-100 in its paper's setting (the release's config/imagenet100.yaml):
ResNet-18, batch 64, 120 epochs per task of which the last 30 fine-tune the head at lr 0.005
(here: 90 epochs, then rdfcil.finetune_epochs = 30), lr 0.1 x0.1 at epochs 30 and 60,
weight decay 1e-4, random-resized crop + flip, 10,000 generator iterations, 10 tasks in the
release's class order.

    python -m abd_jax.main --config=configs/imagenet100_rdfcil.py --workdir=runs/in100_rdfcil \
        --config.data_dir=<data_dir with imagenet2012 prepared (configs/imagenet100.py)>
"""
from configs import imagenet100

# The release's ImageNet-100 class order (positions in the 100 classes).
RELEASE_CLASS_ORDER = (
    68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1,
    85, 19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20,
    10, 31, 54, 37, 95, 14, 71, 96, 98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0,
    88, 27, 18, 94, 11, 12, 47, 25, 30, 46, 62, 69, 36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73,
    93, 39, 67, 29, 49, 57, 33)


def get_config():
    c = imagenet100.get_config()
    c.method = "rdfcil"
    c.class_order = ",".join(map(str, RELEASE_CLASS_ORDER))
    c.batch_size = 64
    c.epochs = 90
    c.lr_milestones = (30, 60)
    c.weight_decay = 1e-4
    c.rdfcil.finetune_epochs = 30
    c.rdfcil.finetune_lr_scale = 0.05  # 0.005 / 0.1
    c.synthesis.iterations = 10_000
    return c
