"""ImageNet (ILSVRC-2012), 10 tasks of 100 classes (docs/algorithm.md §1-3): ResNet-18 at 224x224,
batch 256, weight decay 1e-4, 100 epochs with lr x0.1 after 30, 60, 80, 90; class order from
the fixed seed 1993; random-resized crop (host) + flip (device) for training, resize 256 +
centre crop 224 for testing; 50,000 generator iterations per task. Prepare the data offline:

    python -m abd_jax.prepare_data --dataset=imagenet2012 --manual_dir=<folder with
        ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar> --data_dir=<data_dir>
"""
from configs import cifar100


def get_config():
    c = cifar100.get_config()
    c.dataset = "imagenet2012"
    c.input_pipeline = "stream"  # 1.28M JPEGs of varying size: read and cropped on the host
    # Random-resized crop happens on the host (abd_jax.transforms); the device only flips.
    c.augment.brightness = 0.0
    c.augment.contrast = 0.0
    c.augment.flip = True
    c.augment.crop_padding = 0
    c.num_tasks = 10
    # class_order "release" (from cifar100.py) is, for ImageNet, numpy's seed-1993 order in
    # every repeat (the release's trainer.py); repeat r trains with seed r, as the release.
    c.model = "resnet18"
    c.batch_size = 256
    c.weight_decay = 1e-4
    c.epochs = 100
    c.lr_milestones = (30, 60, 80, 90)
    c.synthesis.iterations = 50_000
    c.eval_batch_size = 250    # 224x224 images; divides the 5,000 test images of a task
    return c
