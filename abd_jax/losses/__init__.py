"""Every loss of docs/algorithm.md, once, as pure jnp functions (no Flax, no state, no data),
in one module per family: `core` (masks, CE, KD, ABD's terms), `baselines`, `rdfcil`,
`synthesis`, `statistics` (NCM, FeCAM, FeTrIL, the drift of class means), `analytic` (ACIL, DS-AL); all of them are read as `losses.<name>`.

Conventions: `B` batch, `K` logit columns. Each function returns a 0-d array, the mean over
the batch unless stated. Functions that take "already sliced" logits (e.g. `[B, K_new]`) also
accept full-width logits whose invalid columns were pushed to `NEG_INF` by `mask_logits`
(the softmax-based losses are then identical); where a loss is not softmax-based, an optional
keyword gives the column count instead, so one compiled step serves every task.
"""
from abd_jax.losses.core import (
    column_mask, feature_kd_loss, head_finetune_ce, kd_loss, local_ce_loss, mask_logits, NEG_INF,
    padded_soft_kd_loss, soft_kd_loss, task_balancing_weights, valid_ce_loss, weighted_ce_loss)
from abd_jax.losses.analytic import cleansed_residual, expand, recursive_ridge, ridge
from abd_jax.losses.baselines import (
    bias_correction, bic_stage1_loss, bic_stage2_loss, dgr_solver_loss, e2e_balanced_loss,
    e2e_loss, e2e_new_class_targets, e2e_task_weights, lwf_mc_loss, taskwise_kd_loss, vae_loss)
from abd_jax.losses.rdfcil import (
    class_balance_weights, class_weighted_ce_loss, logit_l1_loss, rdfcil_weights, rkd_angle_loss)
from abd_jax.losses.statistics import (
    adversarial_step, class_covariance, correlation, fecam_precision, fecam_scores,
    feature_mse, fetril_pseudo_features, linear_map_loss, ncm_scores, sdc_drift,
    shrink_covariance, tukey, unit_rows)
from abd_jax.losses.synthesis import (
    bn_alignment_loss, bn_stat_kl, content_loss, diversity_loss, smoothness_loss)

__all__ = [
    "NEG_INF", "column_mask", "mask_logits", "weighted_ce_loss", "valid_ce_loss",
    "head_finetune_ce", "local_ce_loss", "task_balancing_weights", "soft_kd_loss", "kd_loss",
    "padded_soft_kd_loss", "feature_kd_loss", "taskwise_kd_loss", "e2e_task_weights", "e2e_loss",
    "e2e_balanced_loss", "e2e_new_class_targets", "bias_correction", "bic_stage1_loss",
    "bic_stage2_loss", "dgr_solver_loss", "lwf_mc_loss", "vae_loss", "rdfcil_weights",
    "logit_l1_loss", "rkd_angle_loss", "class_balance_weights", "class_weighted_ce_loss",
    "bn_stat_kl", "bn_alignment_loss", "smoothness_loss", "diversity_loss", "content_loss",
    "unit_rows", "tukey", "class_covariance", "shrink_covariance", "correlation",
    "fecam_precision", "ncm_scores", "fecam_scores", "fetril_pseudo_features", "expand",
    "recursive_ridge", "ridge", "cleansed_residual", "sdc_drift", "feature_mse",
    "adversarial_step", "linear_map_loss",
]
