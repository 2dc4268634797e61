"""Class statistics of frozen features and the heads that score with them (docs/algorithm.md
§11): nearest class mean, FeCAM's Tukey transform, covariance shrinkage, correlation
normalisation and Mahalanobis distance, FeTrIL's pseudo-features; and the drift of old class
means under a backbone that keeps training (§13: SDC's kernel, ADC's adversarial step, LDC's
linear map).

The covariance side runs on the host in float64 (NumPy), as the official code computes it
(`np.cov`, a float64 `torch.linalg.pinv`); the scores run on device in float32. Functions
that serve both take NumPy or JAX arrays and compute with the same module (`_xp`).
Features `[n, D]`, class means `[C, D]`; scores `[n, C]` are negated distances (the largest
wins), `NEG_INF` past the valid classes `[0, K_new)`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from abd_jax.losses.core import mask_logits

# FeCAM's `_eval_maha` divides a feature by its norm plus this before the Tukey transform.
FEATURE_EPSILON = 1e-8


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def unit_rows(x, eps: float = 1e-12):
    """Each row over its L2 norm, the norm floored at `eps` (PyTorch's `F.normalize`)."""
    xp = _xp(x)
    return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), eps)


def tukey(x, beta: float):
    """Tukey's ladder of powers: x^beta, log x for beta = 0 (FeCAM's `_tukeys_transform`;
    features after a ReLU are >= 0, a negative value counts as 0)."""
    xp = _xp(x)
    x = xp.maximum(x, 0.0)
    return xp.log(x) if beta == 0 else xp.power(x, beta)


def class_covariance(features: np.ndarray) -> np.ndarray:
    """`np.cov` of a class's features `[n, D]` (unbiased, float64); zeros when n < 2."""
    features = np.asarray(features, np.float64)
    if len(features) < 2:
        return np.zeros((features.shape[1],) * 2)
    return np.cov(features.T)


def shrink_covariance(cov: np.ndarray, alpha1: float = 1.0, alpha2: float = 1.0) -> np.ndarray:
    """FeCAM's shrinkage: S + a1 mean(diag S) I + a2 mean(nonzero off-diagonal of S) (1 - I)."""
    off = cov - np.diag(np.diag(cov))
    nonzero = off != 0
    off_mean = off[nonzero].sum() / nonzero.sum() if nonzero.any() else 0.0
    eye = np.eye(len(cov))
    return cov + alpha1 * np.mean(np.diag(cov)) * eye + alpha2 * off_mean * (1 - eye)


def correlation(cov: np.ndarray) -> np.ndarray:
    """S_ij / sqrt(S_ii S_jj) (a zero variance gives 0 in its row and column)."""
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    outer = np.outer(sd, sd)
    return np.divide(cov, outer, out=np.zeros_like(cov), where=outer > 0)


def fecam_precision(tukey_features: np.ndarray, alpha1: float = 1.0, alpha2: float = 1.0,
                    shrinks: int = 2, normalize: bool = True) -> np.ndarray:
    """float32 `[D, D]` pseudo-inverse of a class's covariance as FeCAM's code builds it:
    `class_covariance` of its Tukey-transformed features, `shrinks` times shrunk (the code
    shrinks twice, deliberately), then `correlation` (float64 throughout)."""
    cov = class_covariance(tukey_features)
    for _ in range(shrinks):
        cov = shrink_covariance(cov, alpha1, alpha2)
    if normalize:
        cov = correlation(cov)
    return np.linalg.pinv(cov).astype(np.float32)


def ncm_scores(features, means, num_seen):
    """-||x / |x| - mu_c / |mu_c|||^2 for every valid class c: nearest class mean on
    L2-normalised features (FeCAM's Table 1 "Euclidean NCM", the drift methods' NCM)."""
    diff = unit_rows(features)[:, None, :] - unit_rows(means)[None, :, :]
    return mask_logits(-jnp.sum(diff * diff, axis=-1), 0, num_seen)


def fecam_scores(features, means, precisions, beta: float, num_seen):
    """FeCAM's test rule: with x the feature over (its norm + 1e-8), mu_c the class's raw
    feature mean, P_c its `fecam_precision`, the score of c is -d_c with
    d_c = (u(g(x)) - u(g(mu_c)))^T P_c (u(g(x)) - u(g(mu_c))), g = `tukey`, u = `unit_rows`.
    features `[n, D]`, means `[C, D]`, precisions `[C, D, D]`."""
    x = features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + FEATURE_EPSILON)
    diff = unit_rows(tukey(x, beta))[:, None, :] - unit_rows(tukey(means, beta))[None, :, :]
    distance = jnp.einsum("ncd,cde,nce->nc", diff, precisions, diff)
    return mask_logits(-distance, 0, num_seen)


def fetril_pseudo_features(features: np.ndarray, labels: np.ndarray, means: np.ndarray,
                           num_old: int, similarity: str = "euclidean"):
    """FeTrIL's pseudo-features of the past classes `[0, K_old)` from the new classes'
    features `[m, D]` (labels `[m]`, in `[K_old, K_new)`): each past class p takes the new
    class n* whose mean is nearest to its own ("euclidean", the official code) or most
    cosine-similar ("cosine", PyCIL's port), and gets every feature x of n* as
    x - mu_n* + mu_p. Returns (features `[m', D]`, labels `[m']`, n* per past class)."""
    old, new = means[:num_old], means[num_old:]
    if similarity == "euclidean":
        nearest = np.argmin(((old[:, None] - new[None]) ** 2).sum(-1), axis=1)
    elif similarity == "cosine":
        nearest = np.argmax(unit_rows(old) @ unit_rows(new).T, axis=1)
    else:
        raise ValueError(f"FeTrIL similarity {similarity!r}: use 'euclidean' or 'cosine'")
    nearest = nearest + num_old
    out_x, out_y = [], []
    for p, n in enumerate(nearest):
        x = features[labels == n]
        out_x.append(x - means[n] + means[p])
        out_y.append(np.full(len(x), p, labels.dtype))
    if not out_x:
        return features[:0], labels[:0], nearest
    return np.concatenate(out_x), np.concatenate(out_y), nearest


def sdc_drift(old_features, new_features, means, sigma: float):
    """SDC's estimate of each class mean's drift `[C, D]` from the current images' features
    under the old and the new model (`[n, D]` each, paired): with
    w_ic = exp(-|f_old_i - mu_c|^2 / (2 sigma^2)) + 1e-5 normalised over i,
    drift_c = sum_i w_ic (f_new_i - f_old_i)."""
    xp = _xp(old_features)
    distance = xp.sum((old_features[None, :, :] - means[:, None, :]) ** 2, axis=-1)
    w = xp.exp(-distance / (2 * sigma ** 2)) + 1e-5
    w = w / xp.sum(w, axis=1, keepdims=True)
    return w @ (new_features - old_features)


def feature_mse(features, targets):
    """PyTorch's `MSELoss()`: the mean over every element of (features - targets)^2."""
    return jnp.mean((features - targets) ** 2)


def adversarial_step(images, grads, alpha: float, low, high):
    """ADC's step: x - alpha g / |g|, |g| the norm of the whole batch's gradient, clipped to
    `[low, high]` (the loader's extreme normalised values)."""
    return jnp.clip(images - alpha * grads / jnp.linalg.norm(grads), low, high)


def linear_map_loss(kernel, old_features, new_features, weights):
    """LDC's fit: the mean over every element of (f_old P^T - f_new)^2, `kernel` P `[D, D]`
    (PyTorch's `Linear` weight, no bias), over the rows of `weights` 1 (a batch's valid
    rows)."""
    error = (old_features @ kernel.T - new_features) ** 2
    rows = jnp.sum(weights)
    return jnp.sum(error * weights[:, None]) / (rows * old_features.shape[1])


__all__ = ["unit_rows", "tukey", "class_covariance", "shrink_covariance", "correlation",
           "fecam_precision", "ncm_scores", "fecam_scores", "fetril_pseudo_features",
           "sdc_drift", "feature_mse", "adversarial_step", "linear_map_loss"]
