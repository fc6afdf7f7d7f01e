"""Optimisers for plain variables and DVariables: Adam, lazy Adam on the rows a batch touched, and
momentum SGD or LARS (`Momentum`, for ResNet).

`Adam` keeps its slots in the layout of the variable they belong to, so a model-parallel weight has
model-parallel moments and the update needs no communication. Keras optimisers are not used: Keras 3 has
no DTensor support.

`adam_rows` is the same update for the rows of an embedding table a batch touched (lazy Adam): moments
of untouched rows are left alone, the bias correction uses the global step.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

__all__ = ["Adam", "Momentum", "adam_rows", "layout_of", "zeros_like"]


def layout_of(value):
    """The DTensor layout of a tensor or variable, or None for plain TensorFlow values."""
    from tensorflow.experimental import dtensor

    try:
        return dtensor.fetch_layout(value)
    except Exception:
        return None


def zeros_like(variable, name: str | None = None, dtype=None):
    """A variable of zeros with the same shape and layout as `variable` (plain if it is plain)."""
    from tensorflow.experimental import dtensor

    dtype = dtype or variable.dtype
    lay = layout_of(variable)
    if lay is None:
        return tf.Variable(tf.zeros(variable.shape, dtype), trainable=False, name=name)
    return dtensor.DVariable(
        dtensor.call_with_layout(tf.zeros, lay, shape=variable.shape, dtype=dtype),
        trainable=False,
        name=name,
    )


def _scalar_variable(value, like, dtype, name):
    """A scalar variable on the same mesh as `like` (replicated), or plain."""
    from tensorflow.experimental import dtensor

    lay = layout_of(like)
    if lay is None:
        return tf.Variable(tf.constant(value, dtype), trainable=False, name=name)
    return dtensor.DVariable(
        dtensor.call_with_layout(
            tf.fill, dtensor.Layout.replicated(lay.mesh, 0), [], tf.constant(value, dtype)
        ),
        trainable=False,
        name=name,
    )


def _like(value, variable):
    """`value` relaid to `variable`'s layout (a no-op for plain variables)."""
    from tensorflow.experimental import dtensor

    lay = getattr(variable, "layout", None)
    return value if lay is None else dtensor.relayout(value, lay)


class Adam(tf.Module):
    """Adam (Kingma & Ba) with optional decoupled weight decay, for plain variables or DVariables.

        m_t = b1 m + (1 - b1) g          v_t = b2 v + (1 - b2) g²
        w  -= lr_t m_t / (sqrt(v_t) + eps) + lr wd w,   lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)

    Sparse (IndexedSlices) gradients are densified; models with large tables update their rows with
    `adam_rows`.
    """

    def __init__(
        self,
        variables: Sequence[tf.Variable],
        learning_rate: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        weight_decay: float = 0.0,
        name: str = "adam",
    ):
        super().__init__(name=name)
        self.learning_rate = learning_rate
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.weight_decay = weight_decay
        self.iterations = _scalar_variable(0, variables[0], tf.int64, "iterations")
        self.m = [zeros_like(v, name=f"m_{i}") for i, v in enumerate(variables)]
        self.v = [zeros_like(v, name=f"v_{i}") for i, v in enumerate(variables)]

    def apply(self, grads: Sequence, variables: Sequence[tf.Variable], learning_rate=None) -> None:
        # Every new value is computed from reads made before any write, then written. Under DTensor
        # (TF 2.17), reading a DVariable after assigning it in the same tf.function and feeding the read
        # to another variable's assign silently drops that assign (found by the sharded-vs-unsharded
        # test of models/mlp.py: w1 stopped training while its moment kept updating).
        lr = self.learning_rate if learning_rate is None else learning_rate
        step = self.iterations + 1
        t = tf.cast(step, tf.float32)
        lr_t = lr * tf.sqrt(1.0 - tf.pow(self.beta2, t)) / (1.0 - tf.pow(self.beta1, t))
        writes = [(self.iterations, step)]
        for g, var, m, v in zip(grads, variables, self.m, self.v):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)
            new_m = self.beta1 * m + (1.0 - self.beta1) * g
            new_v = self.beta2 * v + (1.0 - self.beta2) * tf.square(g)
            update = lr_t * new_m / (tf.sqrt(new_v) + self.epsilon)
            if self.weight_decay:
                update += lr * self.weight_decay * var
            writes += [(m, new_m), (v, new_v), (var, var - update)]
        for target, value in writes:
            target.assign(_like(value, target))


def adam_rows(value, m, v, grad, *, learning_rate, step, beta1=0.9, beta2=0.999, epsilon=1e-8):
    """Lazy Adam on gathered rows ``value``, ``m``, ``v``, ``grad`` [U, D] at global `step` (0-based,
    before the update); returns the new ``(value, m, v)`` of those rows."""
    t = tf.cast(step + 1, tf.float32)
    correction = tf.sqrt(1.0 - tf.pow(beta2, t)) / (1.0 - tf.pow(beta1, t))
    m = beta1 * m + (1.0 - beta1) * grad
    v = beta2 * v + (1.0 - beta2) * tf.square(grad)
    return value - learning_rate * correction * m / (tf.sqrt(v) + epsilon), m, v


class Momentum(tf.Module):
    """Momentum SGD, or LARS (You, Gitman and Ginsburg 2017) with ``lars_eta``, for plain variables or
    DVariables. Weight decay is coupled (added to the gradient) and applies where `decay_mask` is True
    (kernels; not batch-norm scales, offsets or biases):

        SGD:   v = m v + (g + wd w)                     w -= lr v
        LARS:  trust = eta ||w|| / (||g|| + wd ||w||)  (1 for undecayed weights, or a zero norm)
               v = m v + lr trust (g + wd w)            w -= v
    """

    def __init__(
        self,
        variables: Sequence[tf.Variable],
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        decay_mask: Sequence[bool] | None = None,
        lars_eta: float | None = None,
        name: str = "momentum",
    ):
        super().__init__(name=name)
        self.momentum, self.weight_decay, self.lars_eta = momentum, weight_decay, lars_eta
        self.decay_mask = list(decay_mask) if decay_mask is not None else [True] * len(variables)
        self.iterations = _scalar_variable(0, variables[0], tf.int64, "iterations")
        self.velocity = [zeros_like(v, name=f"velocity_{i}") for i, v in enumerate(variables)]

    def apply(self, grads: Sequence, variables: Sequence[tf.Variable], learning_rate) -> None:
        # Reads before writes, as in `Adam.apply` (a DTensor read-after-assign drops the assign).
        writes = [(self.iterations, self.iterations + 1)]
        for g, var, vel, decay in zip(grads, variables, self.velocity, self.decay_mask):
            if g is None:
                continue
            wd = self.weight_decay if decay else 0.0
            step = g + wd * var if wd else g
            if self.lars_eta is None:
                new_vel = self.momentum * vel + step
                new_var = var - learning_rate * new_vel
            else:
                if decay:
                    w_norm, g_norm = tf.norm(var), tf.norm(g)
                    trust = self.lars_eta * w_norm / (g_norm + wd * w_norm)
                    trust = tf.where((w_norm > 0) & (g_norm > 0), trust, tf.ones_like(trust))
                else:
                    trust = 1.0
                new_vel = self.momentum * vel + learning_rate * trust * step
                new_var = var - new_vel
            writes += [(vel, new_vel), (var, new_var)]
        for target, value in writes:
            target.assign(_like(value, target))
