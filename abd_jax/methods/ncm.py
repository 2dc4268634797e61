"""Nearest class mean on a frozen first-task backbone (FeCAM's Table 1 "Euclidean NCM" row):
after the first task, a test image goes to the class whose mean feature is nearest to its
feature, both L2-normalised (`losses.ncm_scores`). After the first task itself, the cosine
classifier it trained scores the images (FeCAM's code: its first-task prototypes are the
head's weights, and the Euclidean distance of unit vectors ranks as the cosine does)."""
from __future__ import annotations

from abd_jax import losses
from abd_jax.methods.frozen_backbone import PYCIL_RECIPE, FrozenBackbone, chunked_scores
from abd_jax.methods.published import Published

# FeCAM's Table 1 (its authors' poster), average incremental accuracy, warm start.
FECAM_TABLE_1 = ("FeCAM Table 1 (Goswami et al., NeurIPS 2023; the poster in the official "
                 "repository): ResNet-18 (CIFAR stem), first task 200 epochs, the 1993 class "
                 "order, A_inc with the first task; CIFAR-100 B50 (its 20 steps: B40, inferred "
                 "from the field's grid, not shipped in its configs), Tiny-ImageNet B100")


def warm_start(dataset: str, first: int, figures: dict) -> tuple:
    """Published A_inc figures {steps T: mean} under warm start (B = `first`, B40 for 20
    steps on CIFAR-100): num_tasks = T + 1."""
    return tuple(Published(dataset, steps + 1, mean, 0.0, "FeCAM",
                           metric="A_inc", first_task_classes=40 if (steps == 20 and first == 50)
                           else first)
                 for steps, mean in figures.items())


def _ncm():
    return losses.ncm_scores


class NCM(FrozenBackbone):
    name = "ncm"
    rank = 200
    row_settings = PYCIL_RECIPE
    sources = {"FeCAM": FECAM_TABLE_1}
    published = (warm_start("cifar100", 50, {5: 64.8, 10: 64.6, 20: 61.5})
                 + warm_start("tiny_imagenet", 100, {5: 54.1, 10: 53.8, 20: 53.6}))

    def eval_logits(self, rt, state, logits, features, task):
        if task.is_first:
            return logits
        return chunked_scores(rt, (_ncm,), features, state.means, task.num_seen)
