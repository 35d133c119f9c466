"""Weight-consuming primitives shared by every model: the one place a weight meets an activation.

Every matmul with a weight goes through :func:`dense`, every embedding lookup through
:func:`embed`, so a weight may be a float array or a :class:`jquant.qtensor.QTensor`
anywhere in a model. :func:`dense` hands a QTensor weight to
:func:`pallas_kernels.dispatch.qmatmul`: the packed Pallas kernel on GPU, the chunked XLA
dequantize-and-dot elsewhere (``$JQUANT_MATMUL`` or ``pallas_kernels.use_backend`` override it).

Layout convention: kernels are Flax ``(in_features, out_features)``; embedding tables are
``(vocab, hidden)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _qtensor_class():
    """``jquant.qtensor.QTensor``, imported lazily (``None`` if the module is unavailable)."""
    try:
        from jquant.qtensor import QTensor
    except ImportError:  # the quantization core may not be importable in a stripped install
        return None
    return QTensor


def is_qtensor(w: Any) -> bool:
    """Whether ``w`` is a :class:`jquant.qtensor.QTensor` leaf."""
    cls = _qtensor_class()
    return cls is not None and isinstance(w, cls)


def materialize(w: Any, dtype) -> Array:
    """The float array a weight stands for, in ``dtype``.

    Args:
      w: a float array or a ``QTensor`` (dequantized with ``w.dequantize(dtype)``).
      dtype: the dtype of the result (the activation dtype).
    Returns:
      ``w``'s logical shape, in ``dtype``.
    """
    if is_qtensor(w):
        return w.dequantize(dtype)
    return jnp.asarray(w).astype(dtype)


def dense(x: Array, w: Any, bias: Array | None = None) -> Array:
    """``x @ w + bias``, the single matmul-with-a-weight of every model.

    Args:
      x: ``Float[Array, "... in"]`` activations; their dtype is the compute dtype.
      w: ``Float[Array, "in out"]`` kernel in Flax layout, or a ``QTensor`` of that logical shape.
      bias: optional ``Float[Array, "out"]``.
    Returns:
      ``Float[Array, "... out"]`` in ``x.dtype``.
    """
    if is_qtensor(w):
        from pallas_kernels.dispatch import qmatmul

        y = qmatmul(x, w)
    else:
        y = x @ materialize(w, x.dtype)
    if bias is not None:
        y = y + materialize(bias, x.dtype)
    return y


def embed(tokens: Array, table: Any, dtype=None) -> Array:
    """Embedding lookup ``table[tokens]``.

    Args:
      tokens: ``Int[Array, "..."]`` token ids.
      table: ``Float[Array, "vocab hidden"]`` or a ``QTensor`` of that logical shape.
      dtype: result dtype; defaults to the table's (a QTensor's original) dtype.
    Returns:
      ``Float[Array, "... hidden"]``.
    """
    if is_qtensor(table):
        table = table.dequantize(dtype)
    elif dtype is not None:
        table = jnp.asarray(table).astype(dtype)
    return jnp.take(table, tokens, axis=0)


def attend(h: Array, table: Any) -> Array:
    """Tied output projection: logits ``h @ table.T``.

    Args:
      h: ``Float[Array, "... hidden"]``.
      table: ``Float[Array, "vocab hidden"]`` embedding table, or a ``QTensor`` of that shape.
    Returns:
      ``Float[Array, "... vocab"]`` in ``h.dtype``.
    """
    return h @ materialize(table, h.dtype).T


def _init_normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """A linear layer whose ``kernel`` (``(in, out)``) may be a float array or a ``QTensor``.

    Params: ``kernel`` ``Float[Array, "in out"]``, ``bias`` ``Float[Array, "out"]`` (or ``None``).
    Static: ``input_transform`` (``"hadamard"``: the input is rotated online, ``x ↦ x Hᵀ/√n``,
    and the kernel holds ``H W/√n``; :func:`jquant.rotations.fuse_rotations`), then
    ``input_quant``, an activation quantizer of the (rotated) input
    (:func:`jquant.activations.set_quantizers`); ``None`` for neither.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = nnx.Param(_init_normal(rngs, (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None
        self.input_quant = None  # a jquant.activations.ActQuantSpec: quantize the input first
        self.input_transform = None  # "hadamard": rotate the input online first (its transpose is in the kernel)

    def __call__(self, x: Array) -> Array:
        if self.input_transform == "hadamard":
            from jquant.rotations.hadamard import hadamard_transform

            x = hadamard_transform(x)
        if self.input_quant is not None:
            from jquant.activations import fake_quant

            x = fake_quant(x, self.input_quant)
        bias = None if self.bias is None else self.bias.get_value()
        return dense(x, self.kernel.get_value(), bias)


class Embed(nnx.Module):
    """Token embedding; param ``embedding`` ``Float[Array, "vocab hidden"]`` (or a ``QTensor``)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_embeddings = num_embeddings
        self.features = features
        self.embedding = nnx.Param(_init_normal(rngs, (num_embeddings, features), dtype))

    def __call__(self, tokens: Array, dtype=None) -> Array:
        return embed(tokens, self.embedding.get_value(), dtype)

    def attend(self, h: Array) -> Array:
        """Tied lm_head: ``h @ embedding.T``."""
        return attend(h, self.embedding.get_value())


class RMSNorm(nnx.Module):
    """RMSNorm (arXiv:1910.07467), computed in float32, as in Hugging Face.

    ``y = scale * (x / sqrt(mean(x**2) + eps))``; param ``scale`` ``Float[Array, "hidden"]``.
    The normalization runs in float32; the result is cast to the input dtype *before*
    multiplying by ``scale`` (HF ``LlamaRMSNorm``).

    With ``unit_offset=True`` (Gemma, HF ``GemmaRMSNorm``) the weight is ``1 + scale`` (the
    parameter is zero-centred, so a fresh norm holds zeros) and the product is taken in float32
    before the cast: ``y = (x̂ · (1 + scale)).astype(x.dtype)``. Whoever folds a norm into the
    next linear (AWQ, rotations) must use ``1 + scale`` then (:attr:`unit_offset`).
    """

    def __init__(self, features: int, *, eps: float = 1e-6, dtype=jnp.float32, unit_offset: bool = False):
        self.eps = eps
        self.unit_offset = unit_offset
        self.scale = nnx.Param((jnp.zeros if unit_offset else jnp.ones)((features,), dtype))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + self.eps)
        if self.unit_offset:
            return (y * (1.0 + materialize(self.scale.get_value(), jnp.float32))).astype(x.dtype)
        return materialize(self.scale.get_value(), x.dtype) * y.astype(x.dtype)
