"""ImageNet-100 (PODNet's and R-DFCIL's 100-class subset of ILSVRC-2012, abd_jax/data.py),
10 tasks of 10 classes under ABD's ImageNet protocol (configs/imagenet.py: ResNet-18 at
224x224, batch 256, 100 epochs, lr x0.1 after 30, 60, 80, 90, class order from seed 1993,
50,000 generator iterations). Prepare ILSVRC-2012 offline once (both splits are read from
it; a train tar holding only these 100 classes is enough):

    python -m abd_jax.prepare_data --dataset=imagenet100 --manual_dir=<folder with
        ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar> --data_dir=<data_dir>

R-DFCIL in its own paper's ImageNet-100 setting: configs/imagenet100_rdfcil.py.
"""
from configs import imagenet


def get_config():
    c = imagenet.get_config()
    c.dataset = "imagenet100"
    c.num_tasks = 10
    c.eval_batch_size = 250    # divides the 500 test images of a task
    return c
