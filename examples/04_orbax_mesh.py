"""Save a quantized model with Orbax and restore it straight onto a device mesh: every
kernel's packed codes, scales and zeros split by output column over the 'model' axis, the
rest replicated; the sharded forward gives the single-device logits.

    python examples/04_orbax_mesh.py --out /tmp/w4   # on CPU: 8 simulated devices
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jquant as jq  # noqa: E402
from jquant import distributed, models, recipes  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="rtn_w4_g64")
    ap.add_argument("--out", required=True, help="checkpoint directory")
    ap.add_argument("--mesh", default="model=-1", help="e.g. data=2,model=4 (-1: the remaining devices)")
    a = ap.parse_args(argv)

    model, config, tok = models.load(a.model)
    graphdef, state = nnx.split(model)
    qstate = jq.quantize_tree(state, recipes.load_recipe(a.recipe).rules)
    jq.save(a.out, qstate, overwrite=True)  # atomic, with a SHA-256 of every array
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(a.out) for f in fs)
    print(f"saved {len(jq.summary(qstate).quantized)} QTensors to {a.out}: {size / 2**20:.1f} MiB on disk")

    mesh = distributed.make_mesh(a.mesh)
    k = mesh.shape["model"]

    def where(path, part, shape):  # (leaf path, part: array/codes/scale/zero/g_idx/..., stored shape)
        if path.endswith("kernel") and len(shape) == 2 and shape[1] % k == 0:
            return NamedSharding(mesh, P(None, "model"))  # a kernel's columns (and its codes/scales/zeros')
        return NamedSharding(mesh, P())

    restored = jq.restore(a.out, target=qstate, shardings=where)  # target: the tree's types and shapes
    q = next(x for x in jax.tree.leaves(restored, is_leaf=jq.is_qtensor) if jq.is_qtensor(x))
    print(f"mesh {dict(mesh.shape)}: a kernel's codes {q.codes.shape} are held as "
          f"{q.codes.sharding.shard_shape(q.codes.shape)} per device")

    tokens = np.asarray(tok("Quantized models run on many devices.")["input_ids"], np.int32)[None]
    forward = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])
    sharded, single = forward(restored, tokens), forward(qstate, tokens)
    print(f"sharded vs single-device logits: max |diff| {float(abs(sharded - single).max()):.2e}, "
          f"same next tokens: {bool((sharded.argmax(-1) == single.argmax(-1)).all())}")


if __name__ == "__main__":
    main()
