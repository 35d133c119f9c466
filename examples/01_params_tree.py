"""Quantize a plain Flax parameter tree in a script: RTN and GPTQ on a ``params`` dict,
leaves picked by path rules. No model files needed.

    python examples/01_params_tree.py
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jquant as jq
from jquant.quantizers import collect


def mlp(params, x):  # a linen-style two-layer MLP: kernels are (in, out)
    h = jax.nn.gelu(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    return h @ params["dense2"]["kernel"] + params["dense2"]["bias"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    d = a.width
    params = {"dense1": {"kernel": rng.normal(0, d ** -0.5, (d, 4 * d)), "bias": np.zeros(4 * d)},
              "dense2": {"kernel": rng.normal(0, (4 * d) ** -0.5, (4 * d, d)), "bias": np.zeros(d)}}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    # Inputs with a few outlier channels, as in real language models.
    x = rng.normal(0, 1, (2048, d)) * np.where(rng.random(d) < 0.02, 20.0, 1.0)
    x = jnp.asarray(x, jnp.float32)
    ref = mlp(params, x)

    rtn = jq.QuantSpec(bits=a.bits, group_size=a.group_size, symmetric=False)
    gptq = jq.QuantSpec(method="gptq", bits=a.bits, group_size=a.group_size, symmetric=False,
                        options={"act_order": True})
    # GPTQ needs the Hessian of each kernel's input: dense1 reads x, dense2 reads gelu(x W1 + b1).
    h1 = jax.nn.gelu(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    stats = {"dense1/kernel": collect(["hessian"], [x]), "dense2/kernel": collect(["hessian"], [h1])}

    print(f"float: {jq.summary(params).nbytes / 2**20:.2f} MiB")
    for name, spec in (("RTN", rtn), ("GPTQ", gptq)):
        q = jq.quantize_tree(params, [(r"kernel$", spec)], stats=stats)  # biases stay float
        s = jq.summary(q)
        err = float(jnp.sum((mlp(jq.dequantize_tree(q), x) - ref) ** 2) / jnp.sum(ref ** 2))
        print(f"{name:<5} W{a.bits} g{a.group_size}: {s.nbytes / 2**20:.2f} MiB, "
              f"{s.quantized_bits_per_weight:.3f} bits/weight on kernels, relative output error {err:.2e}")
    print(s.table())


if __name__ == "__main__":
    main()
