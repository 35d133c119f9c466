"""A calibration job killed anywhere resumes to the bit-identical result (issue #18).

The full harness (``scripts/kill_resume.py``: SIGKILL at random moments, many trials) runs
here as a short slow slice. The two in-process tests pin the places where resuming
``jquant.calibrate.quantize_model`` once went wrong: a kill between writing the hidden states
and the progress file, and a bfloat16 model.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant import calibrate
from jquant.models import LlamaConfig, init_model

LIN = r"(q|k|v|o|gate|up|down)_proj/kernel$"
SPEC = jq.QuantSpec(bits=3, group_size=32, symmetric=False, method="gptq")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Kill(Exception):
    pass


def tiny(dtype=jnp.float32):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    toks = np.random.default_rng(0).integers(0, 128, size=(16, 64)).astype(np.int32)
    return init_model(cfg, key=0, dtype=dtype), toks


def assert_same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    differ = [i for i, (x, y) in enumerate(zip(la, lb))
              if not np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))]
    assert not differ, f"{len(differ)} of {len(la)} arrays differ after resuming"


def test_kill_between_hidden_states_and_progress(tmp_path, monkeypatch):
    model, toks = tiny()
    ref, _ = calibrate.quantize_model(model, toks, [(LIN, SPEC)], progress=False)
    real = calibrate.write_json

    def dying(path, obj):
        if path.endswith("progress.json") and obj["done"] == 1:  # block 1's hidden.npy is in place
            raise Kill
        real(path, obj)

    monkeypatch.setattr(calibrate, "write_json", dying)
    with pytest.raises(Kill):
        calibrate.quantize_model(model, toks, [(LIN, SPEC)], work_dir=str(tmp_path), progress=False)
    monkeypatch.undo()
    out, _ = calibrate.quantize_model(model, toks, [(LIN, SPEC)], work_dir=str(tmp_path), progress=False)
    assert_same(ref, out)


@pytest.mark.slow
def test_resume_bfloat16_model(tmp_path):
    model, toks = tiny(jnp.bfloat16)

    def killer(e):
        if e.path.startswith("layers/1/"):
            raise Kill

    with pytest.raises(Kill):
        calibrate.quantize_model(model, toks, [(LIN, SPEC)], work_dir=str(tmp_path), progress=False, on_layer=killer)
    out, _ = calibrate.quantize_model(model, toks, [(LIN, SPEC)], work_dir=str(tmp_path), progress=False)
    ref, _ = calibrate.quantize_model(model, toks, [(LIN, SPEC)], progress=False)
    assert_same(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["gptq", "qat", "rotations"])
def test_sigkill_harness_slice(tmp_path, job):
    """Two trials of up to two SIGKILLs each at random moments (os.replace slowed down so some
    land inside atomic writes); every trial ends bit-identical to an uninterrupted run (a
    GPTQ calibration job, a QAT run with its loss curve, and SpinQuant rotation learning)."""
    spec = importlib.util.spec_from_file_location("kill_resume", os.path.join(ROOT, "scripts", "kill_resume.py"))
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    out = tmp_path / "result.json"
    rc = kr.main(["--trials", "2", "--max-kills", "2", "--layers", "2", "--seed", "1", "--dir", str(tmp_path / "runs"),
                  "--json", str(out), "--job", job])
    import json

    result = json.loads(out.read_text())
    assert result["trials"] == 2 and rc == (0 if result["identical"] == 2 else 1)
    assert result["identical"] == 2, [t["difference"] for t in result["details"]]


def test_atomic_writes_reach_the_disk(tmp_path, monkeypatch):
    """Each atomic write flushes the file and then its directory entry (fsync) around the
    rename, so a power loss leaves the old file or the whole new one."""
    from jquant import _atomic

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}")) or real(fd))
    _atomic.write_json(str(tmp_path / "a.json"), {"x": 1})
    _atomic.write_npy(str(tmp_path / "b.npy"), np.arange(3))
    _atomic.write_npz(str(tmp_path / "c.npz"), y=np.arange(2))
    assert synced == [str(tmp_path / "a.json.tmp"), str(tmp_path), str(tmp_path / "b.npy.tmp.npy"), str(tmp_path),
                      str(tmp_path / "c.npz.tmp.npz"), str(tmp_path)]
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.npy", "c.npz"]
    np.testing.assert_array_equal(np.load(tmp_path / "c.npz")["y"], np.arange(2))


def test_training_checkpoint_killed_between_state_and_progress(tmp_path, monkeypatch):
    """Found by ``kill_resume.py --job qat``: the state file was written over before the
    progress file, so a kill between the two resumed step 7's progress with step 8's state
    (every leaf then differed). The state file is now named by its step."""
    from jquant import _atomic, _train_checkpoint as tc

    work = str(tmp_path)
    tc.save(work, "qat", "key", {"w": np.full(3, 7.0)}, 7, [1.0] * 7)

    def killed(path, obj):
        raise KeyboardInterrupt  # the process dies before the progress file is replaced

    monkeypatch.setattr(tc, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        tc.save(work, "qat", "key", {"w": np.full(3, 8.0)}, 8, [1.0] * 8)
    tree, step, losses, _ = tc.restore(work, "qat", "key", {"w": np.zeros(3)}, "QAT")
    assert step == 7 and len(losses) == 7
    np.testing.assert_array_equal(np.asarray(tree["w"]), np.full(3, 7.0))
    monkeypatch.undo()
    tc.save(work, "qat", "key", {"w": np.full(3, 8.0)}, 8, [1.0] * 8)
    assert sorted(f for f in os.listdir(work) if f.endswith(".npz")) == ["qat_state_000008.npz"]
