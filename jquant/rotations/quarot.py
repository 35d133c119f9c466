"""Random rotations of a whole model, as QuaRot (arXiv:2404.00456) places them: R1 on the
residual stream, R2 on every layer's value heads, and an online Hadamard transform (R4) on
the input of down_proj, so that outliers spread across channels before weights, activations
and the KV cache are quantized. The float function is unchanged
(:func:`jquant.rotations.fuse_rotations`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jquant.errors import SpecError, settings_from_dict, short

KINDS = ("hadamard", "orthogonal", "learned")


@dataclasses.dataclass(frozen=True)
class RotationSpec:
    """Which rotations a model gets (a recipe's ``rotation:`` section).

    Attributes:
      kind: ``"hadamard"`` (QuaRot's random Hadamard matrices ``diag(s) Hᵀ/√n``),
        ``"orthogonal"`` (Haar-random orthogonal matrices) or ``"learned"`` (SpinQuant: R1 and
        R2 learned from random Hadamard ones on the calibration text,
        :func:`jquant.rotations.spinquant.learn_rotations`).
      seed: the PRNG seed of the random signs / matrices.
      r1: rotate the residual stream (not for Gemma 3: its post-norms do not commute).
      r2: rotate each layer's value heads (one matrix per layer).
      online: linears whose input is Hadamard-rotated online (default down_proj, R4).
      steps, learning_rate, batch_size, objective: the learning of ``kind="learned"``
        (SpinQuant's 100 steps at 1.5, cosine decay; ``objective`` ``"ce"`` or ``"kl"``).

    Raises:
      SpecError: an unknown kind or key, a value of the wrong type.
    """

    kind: str = "hadamard"
    seed: int = 0
    r1: bool = True
    r2: bool = True
    online: tuple[str, ...] = ("mlp/down_proj",)
    steps: int = 100
    learning_rate: float = 1.5
    batch_size: int = 4
    objective: str = "ce"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SpecError(f"rotation kind={short(self.kind)}: valid: {', '.join(KINDS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SpecError(f"rotation seed={short(self.seed)}: must be an integer >= 0")
        for k in ("r1", "r2"):
            if not isinstance(getattr(self, k), bool):
                raise SpecError(f"rotation {k}={short(getattr(self, k))}: must be true or false")
        online = self.online
        if isinstance(online, str) or not all(isinstance(x, str) for x in online):
            raise SpecError(f"rotation online={short(online)}: must be a list of linear names (e.g. mlp/down_proj)")
        object.__setattr__(self, "online", tuple(online))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["online"] = list(self.online)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> RotationSpec:
        return settings_from_dict(cls, d, "rotation spec")


def rotation_matrix(n: int, kind: str, key) -> np.ndarray:
    """An ``(n, n)`` float64 rotation: ``diag(s) Hᵀ/√n`` with random signs ``s`` (``"hadamard"``;
    exact in float64) or a Haar-random orthogonal matrix (``"orthogonal"``)."""
    from jquant.rotations.hadamard import hadamard_matrix, random_orthogonal, random_signs

    if kind in ("hadamard", "learned"):  # learning starts from random Hadamard matrices
        s = np.asarray(random_signs(n, key), np.float64)
        return s[:, None] * hadamard_matrix(n).T / np.sqrt(n)
    q = np.asarray(random_orthogonal(n, key), np.float64)
    u, _, vt = np.linalg.svd(q)  # re-orthogonalise the float32 draw in float64
    return u @ vt


def rotate(model, spec: RotationSpec):
    """``model`` with the rotations of ``spec`` fused (float function unchanged).

    Returns:
      ``(model, notes)`` as :func:`jquant.rotations.fuse_rotations` (e.g. an untied embedding).
    Raises:
      ShapeError: a size with no Hadamard construction (``kind="orthogonal"`` serves any size).
      UnsupportedModelError: R1 on Gemma 3.
    """
    from jquant.rotations.fuse import fuse_rotations

    if spec.kind == "learned":
        raise SpecError("rotation kind='learned' needs calibration text: use jquant.rotations.spinquant."
                        "learn_rotations, then fuse_rotations (jquant quantize does both)")
    r1, r2 = random_rotations(model.config, spec.kind, spec.seed)
    return fuse_rotations(model, r1=r1 if spec.r1 else None, r2=r2 if spec.r2 else None, online=spec.online)


def random_rotations(config, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """R1 ``(hidden, hidden)`` and R2 ``(layers, head_dim, head_dim)`` (float64) of
    :func:`rotation_matrix` from ``seed``: what :func:`rotate` fuses, and where learning starts."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    r2 = np.stack([rotation_matrix(config.head_dim, kind, k) for k in jax.random.split(k2, config.num_hidden_layers)])
    return rotation_matrix(config.hidden_size, kind, k1), r2
