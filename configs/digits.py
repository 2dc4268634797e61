"""Offline quick look (about a minute on a laptop CPU): scikit-learn's 8x8 digits as a TFDS
dataset, 5 tasks of 2 classes, a ResNet-8. Nothing to download."""
from configs import cifar100


def get_config():
    c = cifar100.get_config()
    c.dataset = "digits"
    c.num_tasks = 5
    c.model = "resnet8"
    c.augment.flip = False      # digits are not mirror-symmetric
    c.augment.crop_padding = 1
    c.batch_size = 32
    c.epochs = 30
    c.lr = 0.05
    c.lr_milestones = (20, 25)
    c.coreset.memory = 60               # ~4% of the 1,442 training images, as 2,000 of CIFAR's 50,000
    c.dgr.z_dim = 32
    c.rdfcil.finetune_epochs = 8        # a quarter of the task's epochs, as the release's 40 / 160
    c.first_task.epochs = 30            # the exemplar-free methods' first task, on this scale
    c.first_task.lr = 0.05
    c.fetril.epochs = 10
    c.lwf_ncm.epochs, c.lwf_ncm.milestones = 30, (13, 27)  # 100 and (45, 90), scaled
    c.analytic.expansion = 1024         # R: 8 MB (the official 8192: 512 MB)
    c.synthesis.iterations = 300
    c.synthesis.z_dim = 100
    c.synthesis.log_every = 100
    c.synthesis.checkpoint_every = 100
    c.eval_batch_size = 256
    c.log_every_steps = 50
    c.checkpoint_every_steps = 100
    return c
