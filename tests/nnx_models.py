"""Small Flax NNX models shared by the tests."""

import jax
from flax import nnx


class MLP(nnx.Module):
    """Two nnx.Linear layers (64 -> 32 -> 8)."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))
