"""Orthogonal rotations for quantization: fusing them into weights (:mod:`jquant.rotations.fuse`)."""

from jquant.rotations.fuse import fold_norms, fuse_rotations

__all__ = ["fold_norms", "fuse_rotations"]
