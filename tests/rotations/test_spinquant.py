"""Learned rotations (SpinQuant) on a tiny model: the loss is the quantized pipeline's, the
Cayley-SGD loop keeps the rotations orthogonal and the fused result function-preserving; bad
settings are refused. (That learning beats the Hadamard start is not shown on this tiny
model: at 64 channels the A4 rounding noise of a step outweighs its gradient signal.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant import calibrate
from jquant.activations import ActQuantSpec, set_quantizers
from jquant.errors import DataError, SpecError
from jquant.models import LlamaConfig, forward, generate, init_model
from jquant.rotations import RotationSpec, fuse_rotations, rotate
from jquant.rotations.spinquant import learn_rotations

LIN = r"_proj/kernel$"
W4 = jq.QuantSpec(bits=4, granularity="channel", symmetric=True)
A4 = [(LIN, ActQuantSpec(bits=4, clip_ratio=0.9))]
KV4 = ActQuantSpec(bits=4, symmetric=False)


def _setup():
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = init_model(cfg, key=2)
    state = nnx.state(model)
    rng = np.random.default_rng(0)
    # outlier channels in the norms: what rotations are for
    new = {jq.path_str(kp): jnp.asarray(1.0 + 4.0 * (rng.random(x.shape) < 0.05) + 0.2 * rng.standard_normal(x.shape),
                                        jnp.float32)
           for kp, x in jax.tree_util.tree_flatten_with_path(state)[0] if jq.path_str(kp).endswith("/scale")}
    # weights of unit-scale outputs (the initial 0.02 makes a near-uniform model with nothing to lose)
    new.update({jq.path_str(kp): x * (50.0 if "embed" in jq.path_str(kp) else 6.0)
                for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]
                if jq.path_str(kp).endswith(("/kernel", "/embedding"))})
    nnx.update(model, calibrate._replace(state, new))
    # text the float model writes itself: a loss worth lowering
    prompts = rng.integers(0, 96, (24, 1)).astype(np.int32)
    toks = np.asarray(generate(model, prompts, 47, key=jax.random.key(0), temperature=1.0))
    return model, toks[:16], toks[16:]


@pytest.fixture(scope="module")
def setup():
    return _setup()


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def _quant_kl(model, toks, ref_logits):
    """Mean KL(float ‖ W4A4KV4 model) per token on ``toks``."""
    qm, _ = set_quantizers(model, A4, KV4)
    gd, st = nnx.split(qm)
    st = jq.quantize_tree(st, [(LIN, W4)])
    lq, lr = _log_softmax(forward(gd, st, jnp.asarray(toks))[0]), _log_softmax(ref_logits)
    return float(np.mean(np.sum(np.exp(lr) * (lr - lq), -1)))


def test_learning_loss_is_the_quantized_pipelines_and_rotations_stay_orthogonal(setup):
    """The loss the rotations are learned on is the KL of the model the pipeline builds: at the
    first step (the random Hadamard start) it equals the KL of ``rotate`` + RTN W4 +
    A4/KV4 quantizers on the same windows. The learned matrices are orthogonal, they moved,
    and fused into the float model they leave its function unchanged."""
    model, train, held = setup
    qmodel, _ = set_quantizers(model, A4, KV4)
    res = learn_rotations(qmodel, train, weight_rules=[(LIN, W4)], steps=6, learning_rate=0.05, batch_size=4,
                          objective="kl")
    hadamard, _ = rotate(model, RotationSpec(kind="hadamard", seed=0))  # the starting point
    gd, st = nnx.split(model)
    ref = np.asarray(forward(gd, st, jnp.asarray(train[:4]))[0])
    np.testing.assert_allclose(res.losses[0], _quant_kl(hadamard, train[:4], ref), rtol=2e-3)
    assert len(res.losses) == 6 and all(np.isfinite(res.losses))
    for r in (res.r1, *res.r2):
        assert np.abs(r.T @ r - np.eye(len(r))).max() < 1e-10
    start = np.asarray(hadamard.embed_tokens.embedding.get_value())
    learned, _ = fuse_rotations(model, res.r1, res.r2, online=("mlp/down_proj",))
    assert np.abs(np.asarray(learned.embed_tokens.embedding.get_value()) - start).max() > 1e-3  # R1 moved
    gl, sl = nnx.split(learned)
    ref_h = np.asarray(forward(gd, st, jnp.asarray(held))[0])
    np.testing.assert_allclose(np.asarray(forward(gl, sl, jnp.asarray(held))[0]), ref_h,
                               atol=1e-4 * np.abs(ref_h).max())
    # what rotations are for: the Hadamard start quantizes far better than no rotation
    assert _quant_kl(hadamard, held, ref_h) < 0.7 * _quant_kl(model, held, ref_h)


def test_bad_settings(setup):
    model, train, _ = setup
    with pytest.raises(SpecError, match="steps=0"):
        learn_rotations(model, train, steps=0)
    with pytest.raises(SpecError, match="learning_rate=0"):
        learn_rotations(model, train, learning_rate=0.0)
    with pytest.raises(SpecError, match="objective='mse'"):
        learn_rotations(model, train, objective="mse")
    with pytest.raises(DataError, match="at least one batch of 8"):
        learn_rotations(model, train[:3], batch_size=8)


def test_cli_prepare_learns_once_and_eval_reuses(setup, tmp_path):
    """``jquant quantize``'s preparation learns the rotations on the calibration windows and
    writes them; a rerun with the same settings and windows reuses them; other windows learn
    again; ``jquant eval`` (no windows) reads them, and without the file it is an error."""
    from jquant import cli, recipes
    from jquant.errors import CheckpointError

    model, train, _ = setup
    recipe = recipes.recipe_from_dict({
        "rules": [{"pattern": LIN, "spec": {"bits": 4, "granularity": "channel", "symmetric": True}}],
        "activations": [{"pattern": LIN, "spec": {"bits": 4, "clip_ratio": 0.9}}],
        "kv_cache": {"bits": 4, "symmetric": False},
        "rotation": {"kind": "learned", "steps": 2, "learning_rate": 0.05, "batch_size": 4, "objective": "kl"}})
    path = str(tmp_path / "rotations.npz")
    first = cli._prepare(model, recipe, tokens=train, rotations=path)
    saved = np.load(path)
    assert saved["r1"].shape == (64, 64) and saved["r2"].shape == (2, 16, 16) and len(saved["losses"]) == 2
    mtime = (tmp_path / "rotations.npz").stat().st_mtime_ns
    again = cli._prepare(model, recipe, tokens=train, rotations=path)
    assert (tmp_path / "rotations.npz").stat().st_mtime_ns == mtime  # reused, not learned again
    at_eval = cli._prepare(model, recipe, rotations=path)
    for m in (again, at_eval):
        jax.tree.map(np.testing.assert_array_equal, nnx.state(m), nnx.state(first))
    assert at_eval.layers[0].mlp.down_proj.input_transform == "hadamard"
    assert at_eval.layers[0].self_attn.kv_quant.bits == 4
    cli._prepare(model, recipe, tokens=train[::-1].copy(), rotations=path)  # other windows: learned again
    assert (tmp_path / "rotations.npz").stat().st_mtime_ns != mtime
    with pytest.raises(CheckpointError, match="learned rotations of this job are missing"):
        cli._prepare(model, recipe, rotations=str(tmp_path / "none.npz"))


def test_interrupted_learning_resumes_bit_identically(setup, tmp_path):
    """Checkpoints every 2 steps: a run stopped after step 3 (its last checkpoint: step 2)
    resumes there and ends with the uninterrupted run's rotations and losses, bit for bit;
    another run's checkpoint is refused."""
    from jquant.errors import CheckpointError

    model, train, _ = setup
    qmodel, _ = set_quantizers(model, A4, KV4)
    kw = dict(weight_rules=[(LIN, W4)], steps=5, learning_rate=0.05, batch_size=4, objective="kl")
    full = learn_rotations(qmodel, train, **kw)

    class Killed(Exception):
        pass

    def kill_after_3(i, loss):
        if i == 2:
            raise Killed

    work = str(tmp_path / "rot")
    with pytest.raises(Killed):
        learn_rotations(qmodel, train, work_dir=work, checkpoint_every=2, on_step=kill_after_3, **kw)
    seen = []
    res = learn_rotations(qmodel, train, work_dir=work, checkpoint_every=2, on_step=lambda i, _: seen.append(i), **kw)
    assert seen == [2, 3, 4]  # resumed after step 2
    assert res.losses == full.losses
    np.testing.assert_array_equal(res.r1, full.r1)
    np.testing.assert_array_equal(res.r2, full.r2)
    with pytest.raises(CheckpointError, match="rotation learning checkpoint of another run"):
        learn_rotations(qmodel, train, work_dir=work, **{**kw, "learning_rate": 0.1})
    with pytest.raises(SpecError, match="checkpoint_every=-1"):
        learn_rotations(qmodel, train, work_dir=work, checkpoint_every=-1, **kw)
