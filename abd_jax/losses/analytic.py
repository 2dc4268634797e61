"""Analytic learning on frozen features (docs/algorithm.md §12): ACIL's random expansion and
recursive ridge regression, DS-AL's compensation targets.

Each function takes NumPy or JAX arrays and computes with the same module, in the arrays'
dtype (the methods call them in float64: NumPy on the host, or jitted under
`jax.enable_x64`). Features `[n, D]`, projection `[D, E]`, expanded features `[n, E]`,
targets `[n, C]`, autocorrelation inverse `R` `[E, E]`, weights `W` `[E, C]`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

ACTIVATIONS = ("relu", "tanh", "identity")


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def expand(features, projection, activation: str):
    """X = sigma(F A): the random expansion ("buffer") with sigma = `activation` (ACIL and
    DS-AL's main stream: relu; DS-AL's compensation stream: tanh). No bias."""
    xp = _xp(features)
    x = features @ projection
    if activation == "relu":
        return xp.maximum(x, 0.0)
    if activation == "tanh":
        return xp.tanh(x)
    if activation == "identity":
        return x
    raise ValueError(f"activation {activation!r}: use one of {ACTIVATIONS}")


def recursive_ridge(r, w, x, y):
    """One batch (X `[b, E]`, Y `[b, C]`) of ACIL's recursive least squares:

        K = (I + X R X^T)^-1,   R' = R - R X^T K X R,   W' = W + R' X^T (Y - X W).

    From R = I / gamma and W = 0, the batches of all data seen give W = (sum X^T X +
    gamma I)^-1 sum X^T Y (`ridge`), whatever the batches. Returns (R', W')."""
    xp = _xp(x)
    k = xp.linalg.inv(xp.eye(x.shape[0], dtype=x.dtype) + x @ r @ x.T)
    rx = r @ x.T
    r = r - rx @ k @ rx.T
    return r, w + r @ x.T @ (y - x @ w)


def ridge(x, y, gamma: float):
    """The closed form: (X^T X + gamma I)^-1 X^T Y, `[E, C]`."""
    xp = _xp(x)
    return xp.linalg.solve(x.T @ x + gamma * xp.eye(x.shape[1], dtype=x.dtype), x.T @ y)


def cleansed_residual(y, main_scores, cleansed: int):
    """DS-AL's compensation targets: Y - X_main W_main with the first `cleansed` columns set
    to 0 ("previous label cleansing"; the official code clears all but the task's newest
    columns of the targets' current width)."""
    xp = _xp(y)
    residual = y - main_scores
    keep = xp.arange(y.shape[1]) >= cleansed
    return xp.where(keep[None, :], residual, 0.0)


__all__ = ["expand", "recursive_ridge", "ridge", "cleansed_residual"]
