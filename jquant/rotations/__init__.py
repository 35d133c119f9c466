"""Rotations that leave a float model unchanged and make it easier to quantize.

:mod:`.hadamard`: Hadamard matrices (Sylvester, Paley I/II, Williamson), the fast
Walsh–Hadamard transform, QuaRot's randomised Hadamard rotation (arXiv:2404.00456) and
Haar-random orthogonal matrices (SpinQuant's initialisation, arXiv:2405.16406).
:mod:`.cayley`: Cayley SGD (arXiv:2002.01113), the Optax transformation SpinQuant learns its
rotations with, and :func:`project_orthogonal`.
:mod:`.fuse`: folding norms and fusing rotations into a model's weights; :mod:`.quarot`: a
whole model's random rotations (R1, R2, online R4) from a :class:`RotationSpec`.
"""

from jquant.rotations.cayley import CayleySgdState, cayley_sgd, project_orthogonal
from jquant.rotations.fuse import fold_norms, fuse_rotations
from jquant.rotations.quarot import RotationSpec, random_rotations, rotate, rotation_matrix
from jquant.rotations.hadamard import (hadamard_matrix, hadamard_supported, hadamard_transform,
                                       random_hadamard_matrix, random_hadamard_transform, random_orthogonal,
                                       random_signs)

__all__ = ["CayleySgdState", "RotationSpec", "cayley_sgd", "fold_norms", "fuse_rotations", "rotate", "rotation_matrix", "hadamard_matrix", "hadamard_supported", "hadamard_transform",
           "random_hadamard_matrix", "random_hadamard_transform", "project_orthogonal", "random_orthogonal",
           "random_signs"]
