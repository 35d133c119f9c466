"""Fusing orthogonal rotations into a model's weights without changing its float function
(QuaRot, arXiv:2404.00456; SpinQuant, arXiv:2405.16406).

Flax layout throughout: a linear is ``y = x @ W`` with ``W`` of shape ``(in, out)``; hidden
states are row vectors.

- **Norm folding** (:func:`fold_norms`): the weight ``γ`` of an RMSNorm that feeds linears
  (Llama's ``input_layernorm`` → q/k/v and ``post_attention_layernorm`` → gate/up; Gemma's
  ``input_layernorm`` and ``pre_feedforward_layernorm``, whose weight is ``1 + w``; the final
  norm → lm_head) moves into their rows, ``W ← diag(γ) W``, and the norm weighs by 1 after.
  A tied embedding whose final norm weight is not all ones is untied first (the lm_head gets
  ``diag(γ) Eᵀ``, the embedding keeps ``E``).
- **R1** (``(hidden, hidden)``, orthogonal) rotates the residual stream ``h → h R1``: the
  embedding ``E ← E R1``; every linear reading a (norm of the) residual ``W ← R1ᵀ W`` (q/k/v,
  gate/up, lm_head); every linear writing it ``W ← W R1`` (o_proj, down_proj, and their
  biases). An RMSNorm with weight 1 commutes with it (``rms(h R1) = rms(h)``). Gemma 3 cannot
  take R1: its post-attention and post-MLP norms weigh the rotated outputs elementwise before
  the residual adds, which no folding undoes (an error says so).
- **R2** (one ``(head_dim, head_dim)`` per layer) rotates each value head ``v ← v R2`` and
  un-rotates it in o_proj's rows, ``W_o[head] ← R2ᵀ W_o[head]``: attention mixes value rows
  linearly, so the output is unchanged (any family).
- **Online** (R4 on down_proj's input): the model rotates a linear's input at run time by the
  normalised Hadamard transform, ``x ↦ x Hᵀ/√n``, and its kernel takes ``H W/√n``, so an
  activation quantizer placed on that linear sees the rotated input (any family).

Everything is computed in float64 on the host and cast back to the parameter dtype once, so
the rotated float32 model's logits equal the original's to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from jquant.errors import ShapeError, SpecError, UnsupportedModelError
from jquant.qtensor import is_qtensor
from jquant.spec import path_str


def _params(model) -> dict[str, np.ndarray]:
    """Every parameter of ``model`` as a float64 array, by path (``layers/0/self_attn/q_proj/kernel``)."""
    out = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(nnx.state(model), is_leaf=is_qtensor)[0]:
        path = path_str(kp)
        if is_qtensor(x):
            raise SpecError(f"{path}: is quantized; rotations are fused into float weights: rotate the float model, "
                            "then quantize it")
        out[path] = np.asarray(jax.device_get(x), np.float64)
    return out


def _rebuild(model, config, params: dict[str, np.ndarray], online: Sequence[str] = ()):
    """A model of ``config`` (same family and dtype) holding ``params``; the static settings of
    ``model``'s linears and attention layers (transforms, quantizers) are kept, and the linears
    named in ``online`` (in every block) rotate their inputs online."""
    from jquant.models.layers import Linear
    from jquant.models.llama import Attention, abstract_model

    new = abstract_model(config, dtype=model.dtype)
    old = {p: n for p, n in nnx.iter_graph(model) if isinstance(n, (Linear, Attention))}
    for p, node in nnx.iter_graph(new):
        if isinstance(node, Attention) and p in old:
            node.kv_quant = old[p].kv_quant
        if isinstance(node, Linear):
            if p in old:
                node.input_transform = old[p].input_transform
                node.input_quant = old[p].input_quant
            if len(p) >= 2 and "/".join(map(str, p[2:])) in online:
                node.input_transform = "hadamard"
    state = nnx.state(new)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    values = []
    for kp, x in leaves:
        path = path_str(kp)
        values.append(jax.numpy.asarray(params[path].astype(x.dtype)))
    nnx.update(new, jax.tree_util.tree_unflatten(treedef, values))
    return new


def _norm_weight(block_or_model_norm, w: np.ndarray) -> np.ndarray:
    return 1.0 + w if block_or_model_norm.unit_offset else w


def fold_norms(model):
    """The model with every RMSNorm weight that feeds linears folded into them (see the module
    doc); returns ``(model, notes)``, ``notes`` saying what changed beyond the folding (an
    untied embedding). The float function is unchanged.

    Raises:
      SpecError: a quantized weight (fold and rotate before quantizing).
    """
    config = model.config
    p = _params(model)
    notes = []
    for i, block in enumerate(model.layers):
        for names, fold in type(block).LINEAR_GROUPS:
            if fold[0] not in ("scale", "scale+1"):
                continue
            norm_path = f"layers/{i}/{fold[1]}"
            gamma = p[norm_path] + (1.0 if fold[0] == "scale+1" else 0.0)
            for n in names:
                p[f"layers/{i}/{n}/kernel"] = gamma[:, None] * p[f"layers/{i}/{n}/kernel"]
            p[norm_path] = np.full_like(gamma, 0.0 if fold[0] == "scale+1" else 1.0)
    gamma = _norm_weight(model.norm, p["norm/scale"])
    if config.tie_word_embeddings and not np.all(gamma == 1.0):
        config = dataclasses.replace(config, tie_word_embeddings=False)
        p["lm_head/kernel"] = p["embed_tokens/embedding"].T.copy()
        notes.append("the tied embedding was untied: the final norm's weight is folded into a new lm_head "
                     f"({p['lm_head/kernel'].shape[0]}×{p['lm_head/kernel'].shape[1]}), the embedding keeps its values")
    if "lm_head/kernel" in p:
        p["lm_head/kernel"] = gamma[:, None] * p["lm_head/kernel"]
        p["norm/scale"] = np.full_like(gamma, 0.0 if model.norm.unit_offset else 1.0)
    return _rebuild(model, config, p), notes


def _check_orthogonal(r: np.ndarray, n: int, what: str) -> np.ndarray:
    r = np.asarray(r, np.float64)
    if r.shape != (n, n):
        raise ShapeError(f"{what}: shape {r.shape}, expected ({n}, {n})")
    if not np.all(np.isfinite(r)):
        raise SpecError(f"{what}: holds NaN/Inf")
    err = float(np.abs(r.T @ r - np.eye(n)).max())
    if err > 1e-4:
        raise SpecError(f"{what}: not orthogonal (max |RᵀR − I| = {err:.2e}, at most 1e-4 allowed)")
    return r


def fuse_rotations(model, r1=None, r2=None, online: Sequence[str] = ()):
    """The model with rotations fused into its weights (see the module doc); its float
    function is unchanged. Returns ``(model, notes)``.

    Args:
      model: a float :class:`jquant.models.Llama` or :class:`jquant.models.Gemma3` (left
        unchanged).
      r1: ``(hidden, hidden)`` orthogonal matrix on the residual stream, or ``None``. Norms
        are folded first (:func:`fold_norms`).
      r2: ``(head_dim, head_dim)`` (every layer) or ``(layers, head_dim, head_dim)``
        orthogonal matrices on the value heads, or ``None``.
      online: linears of every block (``"mlp/down_proj"``: QuaRot/SpinQuant's R4) whose input
        the model rotates online by the normalised Hadamard transform ``x ↦ x Hᵀ/√n``
        (:func:`jquant.rotations.hadamard_transform`); their kernels take ``H W/√n``.
    Raises:
      UnsupportedModelError: R1 on Gemma 3 (its post-norms do not commute with it).
      ShapeError / SpecError: a matrix of the wrong shape, not orthogonal (``|RᵀR − I| >
        1e-4``) or not finite; a quantized weight.
    """
    config = model.config
    notes: list[str] = []
    if r1 is not None:
        if getattr(model.layers[0], "post_feedforward_layernorm", None) is not None:
            raise UnsupportedModelError(
                f"{config.model_type}: a residual-stream rotation (R1) cannot be fused: the post-attention and "
                "post-MLP RMSNorms weigh their outputs elementwise (1 + w) before the residual adds, which does not "
                "commute with a rotation; R2 (value heads) can")
        r1 = _check_orthogonal(r1, config.hidden_size, "R1")
        model, notes = fold_norms(model)
        config = model.config
    p = _params(model)
    hd, layers = config.head_dim, config.num_hidden_layers
    if r2 is not None:
        r2 = np.asarray(r2, np.float64)
        if r2.ndim == 2:
            r2 = np.broadcast_to(r2, (layers, hd, hd))
        if r2.shape != (layers, hd, hd):
            raise ShapeError(f"R2: shape {r2.shape}, expected ({hd}, {hd}) or ({layers}, {hd}, {hd})")
        r2 = np.stack([_check_orthogonal(r, hd, f"R2 of layer {i}") for i, r in enumerate(r2)])
    p = rotate_params(p, config, type(model.layers[0]).LINEAR_GROUPS, r1, r2, xp=np)
    from jquant.rotations.hadamard import hadamard_matrix

    names = {n for g, _ in type(model.layers[0]).LINEAR_GROUPS for n in g}
    bad = [n for n in online if n not in names]
    if bad:
        raise SpecError(f"online rotation of {bad}: not a linear of the block; valid: {', '.join(sorted(names))}")
    for name in online:
        for i in range(layers):
            if _linear(model, i, name).input_transform is not None:
                raise SpecError(f"layers/{i}/{name}: its input is already rotated online")
            w = p[f"layers/{i}/{name}/kernel"]
            p[f"layers/{i}/{name}/kernel"] = hadamard_matrix(w.shape[0]) @ w / math.sqrt(w.shape[0])
    return _rebuild(model, config, p, online), notes


def rotate_params(p: dict, config, groups, r1=None, r2=None, xp=np) -> dict:
    """R1 and R2 applied to a norm-folded parameter dict (paths as :func:`fuse_rotations`'s
    model), with ``xp`` = ``numpy`` (float64 fusion) or ``jax.numpy`` (differentiable in the
    rotations, for learning them). Returns a new dict; see the module doc for the maps."""
    p = dict(p)
    hd, kv, h = config.head_dim, config.num_key_value_heads, config.num_attention_heads
    if r1 is not None:
        p["embed_tokens/embedding"] = p["embed_tokens/embedding"] @ r1
        if "lm_head/kernel" in p:
            p["lm_head/kernel"] = r1.T @ p["lm_head/kernel"]
    for i in range(config.num_hidden_layers):
        pre = f"layers/{i}/"
        if r1 is not None:
            for names, _ in groups:
                for n in names:
                    w = p[f"{pre}{n}/kernel"]
                    if n in ("self_attn/o_proj", "mlp/down_proj"):  # write the residual stream
                        p[f"{pre}{n}/kernel"] = w @ r1
                        if f"{pre}{n}/bias" in p:
                            p[f"{pre}{n}/bias"] = p[f"{pre}{n}/bias"] @ r1
                    else:  # read it (through a norm of weight 1)
                        p[f"{pre}{n}/kernel"] = r1.T @ w
        if r2 is not None:
            r = r2[i]
            wv = p[f"{pre}self_attn/v_proj/kernel"]
            p[f"{pre}self_attn/v_proj/kernel"] = (wv.reshape(-1, kv, hd) @ r).reshape(wv.shape)
            if f"{pre}self_attn/v_proj/bias" in p:
                bv = p[f"{pre}self_attn/v_proj/bias"]
                p[f"{pre}self_attn/v_proj/bias"] = (bv.reshape(kv, hd) @ r).reshape(bv.shape)
            wo = p[f"{pre}self_attn/o_proj/kernel"]
            p[f"{pre}self_attn/o_proj/kernel"] = xp.einsum("ji,hjo->hio", r, wo.reshape(h, hd, -1)).reshape(wo.shape)
    return p


def _linear(model, i: int, name: str):
    node = model.layers[i]
    for part in name.split("/"):
        node = getattr(node, part)
    return node
