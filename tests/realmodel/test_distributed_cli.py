"""`jquant quantize` on several devices and processes, on the real default model."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jquant import cli

pytestmark = pytest.mark.realmodel
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--recipe", "gptq_w4_g64", "--calib-windows", "4", "--calib-seq-len", "64", "--quiet"]


def test_bad_mesh_is_refused_before_any_work(tmp_path, capsys):
    out = str(tmp_path / "m")
    assert cli.main(["quantize", "--out", out, "--mesh", "data=2,model=3", *ARGS]) == 1
    err = capsys.readouterr().err
    assert "needs 6 devices, but there are 1" in err and "valid meshes: data=1,model=1" in err
    assert cli.main(["quantize", "--out", out, "--mesh", "pipeline=2", *ARGS]) == 1
    assert "unknown axis 'pipeline'" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "params"))


@pytest.mark.slow
def test_two_processes_through_the_cli(tmp_path):
    """Two processes × one CPU device (gloo): process 0 writes the directory, process 1 only
    computes; the first linear's codes equal a single-process run's (later ones may differ
    by summation order: a Hessian summed over two devices rounds differently, and GPTQ's
    error feedback carries a flipped code on), and the layers' errors agree to a few percent."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JQUANT_COORDINATOR=f"localhost:{port}",
                   JQUANT_NUM_PROCESSES="2", JQUANT_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-m", "jquant.cli", "quantize", "--out", str(tmp_path / "two"),
                                       *ARGS], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, "\n".join(l for l in o.splitlines() if "Gloo" not in l)[-3000:]
    assert "process 1: done (process 0 writes" in outs[1] and "quantized 210 leaves" in outs[0]
    assert cli.main(["quantize", "--out", str(tmp_path / "one"), *ARGS]) == 0
    import jax

    import jquant as jq

    two = json.load(open(tmp_path / "two" / "layers.json"))
    one = json.load(open(tmp_path / "one" / "layers.json"))
    assert two["mesh"] == {"data": 2, "model": 1, "processes": 2}
    ratio = np.array([a["recon"] / b["recon"] for a, b in zip(two["layers"], one["layers"])])
    assert abs(np.mean(ratio) - 1) < 0.02 and np.all(np.abs(ratio - 1) < 0.2), ratio
    q = "layers/0/self_attn/q_proj/kernel"
    codes = []
    for d in ("two", "one"):
        leaves = jax.tree_util.tree_flatten_with_path(jq.restore(str(tmp_path / d / "params")), is_leaf=jq.is_qtensor)[0]
        codes.append(next(np.asarray(x.codes) for kp, x in leaves if jq.path_str(kp) == q))
    np.testing.assert_array_equal(*codes)
