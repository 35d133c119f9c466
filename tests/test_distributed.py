"""Meshes, QTensors under shard_map, data-parallel statistics and the sharded GPTQ solve.

The multi-device parts run in a subprocess with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and are compared with the same
computation done here, on one device.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant import calibrate, distributed as dist
from jquant.errors import DataError, SpecError
from jquant.models import LlamaConfig, init_model
from jquant.quantizers import gptq, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = """
import numpy as np, jax, jax.numpy as jnp
import jquant as jq
from jquant.models import LlamaConfig, init_model

def problem():
    rng = np.random.default_rng(0)
    K, N = 256, 100  # 100 columns: padded to 104 over 8 devices
    X = rng.standard_normal((2048, K)).astype(np.float32) * np.linspace(0.2, 3, K).astype(np.float32)
    return jnp.asarray(rng.standard_normal((K, N)).astype(np.float32)), jnp.asarray(2 * X.T @ X / len(X)), X

def tiny():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    toks = np.random.default_rng(0).integers(0, 128, size=(16, 64)).astype(np.int32)
    return init_model(cfg, key=0), toks

RULES = [(r"(q|k|v)_proj/kernel$", jq.QuantSpec(bits=3, group_size=32, symmetric=False, method="gptq",
                                                options={"act_order": True})),
         (r"(gate|up)_proj/kernel$", jq.QuantSpec(bits=4, group_size=32, symmetric=False, method="awq")),
         (r"o_proj/kernel$", jq.QuantSpec(bits=4, group_size=32, method="outliers")),
         (r"down_proj/kernel$", jq.QuantSpec(bits=4, group_size=32, symmetric=False, method="gptq"))]
GPTQ_SPECS = {"plain": jq.QuantSpec(bits=3, group_size=64, symmetric=False, method="gptq"),
              "act_order": jq.QuantSpec(bits=3, group_size=64, symmetric=False, method="gptq",
                                        options={"act_order": True}),
              "static": jq.QuantSpec(bits=4, group_size=64, method="gptq",
                                     options={"act_order": True, "static_groups": True})}

def codes_of(state):
    return {jq.path_str(kp): np.asarray(x.codes) for kp, x in
            jax.tree_util.tree_flatten_with_path(state, is_leaf=jq.is_qtensor)[0] if jq.is_qtensor(x)}
"""

SCRIPT = COMMON + """
import json, sys
from jax.sharding import PartitionSpec as P
from jquant import calibrate, distributed as dist
from jquant.errors import ShapeError, SpecError
from jquant.quantizers import gptq, stats
assert jax.device_count() == 8
import os
out, report = {}, {"nproc": os.environ.get("NPROC")}

# QTensors across the shard_map boundary, both ways, on a 2x4 mesh.
mesh = dist.make_mesh("data=2,model=4")
w, H, X = problem()
w = w[:, :96]
qt = jq.quantize(w, jq.QuantSpec(bits=4, group_size=64, symmetric=False))
deq = dist.shard_map(lambda q: q.dequantize(), mesh=mesh, in_specs=P(None, "model"), out_specs=P(None, "model"))(qt)
report["dequant_equal"] = bool(np.array_equal(np.asarray(deq), np.asarray(qt.dequantize())))
def body(w):
    q = jq.quantize(w, jq.QuantSpec(bits=4, group_size=64, symmetric=False))
    return q, jnp.asarray(q.shape)
q2, local_shape = dist.shard_map(body, mesh=mesh, in_specs=P(None, ("data", "model")),
                                 out_specs=(P(None, ("data", "model")), P()))(w)
report["local_shape"] = [int(v) for v in local_shape]
report["global_shape"] = list(q2.shape)
report["quant_equal"] = all(np.array_equal(np.asarray(getattr(q2, p)), np.asarray(getattr(qt, p)))
                            for p in ("codes", "scale", "zero"))
sq = dist.shard_qtensor(qt, mesh, P(None, "model"))
report["codes_shards"] = sorted({tuple(s.data.shape) for s in sq.codes.addressable_shards})
report["scale_shards"] = sorted({tuple(s.data.shape) for s in sq.scale.addressable_shards})
for name, bad in [("grouped_axis", P("model", None)), ("indivisible", None)]:
    try:
        if bad is None:
            dist.shard_qtensor(jq.quantize(w[:, :90], jq.QuantSpec(bits=4, group_size=64)), mesh, P(None, "model"))
        else:
            dist.shard_qtensor(qt, mesh, bad)
        report[name] = "no error"
    except (ShapeError, SpecError) as e:
        report[name] = type(e).__name__ + ": " + str(e)

# Statistics of a batch split over 'data' (8 devices), reduced with psum/pmax.
mesh8 = dist.make_mesh("data=8")
coll = stats.Collector(("act_abs_max", "act_abs_mean", "act_sq_mean", "hessian"))
upd = jax.jit(jax.shard_map(lambda st, x: coll.update(st, x, "data"), mesh=mesh8,
                            in_specs=(P(), P("data")), out_specs=P()))
st = coll.init(X.shape[1])
for b in range(0, len(X), 512):
    st = upd(st, jnp.asarray(X[b:b + 512]))
for k, v in coll.finalize(st).items():
    out["stat_" + k] = np.asarray(v)

# GPTQ with its output columns split over all 8 devices (100 columns: padded).
w, H, _ = problem()
for name, spec in GPTQ_SPECS.items():
    q, info = gptq.gptq_quantize(w, H, spec, mesh=mesh)
    out["gptq_" + name] = np.asarray(q.codes)
    out["gptq_scale_" + name] = np.asarray(q.scale, np.float32)
    out["gptq_loss_" + name] = np.float64(info.loss)
    report["gptq_shape_" + name] = list(q.shape)

# The whole pipeline: batches over 'data', GPTQ columns over every device.
model, toks = tiny()
for m in ("data=8", "data=2,model=4"):
    state, logs = calibrate.quantize_model(model, toks, RULES, batch_size=8, progress=False,
                                           mesh=dist.make_mesh(m))
    for k, v in codes_of(state).items():
        out[m + "|" + k] = v
    out[m + "|recon"] = np.array([e.recon if e.recon is not None else np.nan for e in logs])
# The quantized model's forward with kernels split by output column over 'model' (jit, GSPMD).
from flax import nnx
from jquant.models import forward
gd, _ = nnx.split(model)
mesh24 = dist.make_mesh("data=2,model=4")
sharded = dist.shard_params(state, mesh24)
out["sharded_logits"] = np.asarray(forward(gd, sharded, jnp.asarray(toks[:2]))[0])
q = {jq.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(sharded, is_leaf=jq.is_qtensor)[0]}
report["sharded_q_codes"] = str(q["layers/0/self_attn/q_proj/kernel"].codes.sharding.spec)
np.savez(OUT + ".npz", **out)
json.dump(report, open(OUT + ".json", "w"))
"""


@pytest.fixture(scope="module")
def eight(tmp_path_factory, cpu_devices_env):
    """What the 8-device subprocess computed: ``(arrays, report)``."""
    out = str(tmp_path_factory.mktemp("dist") / "eight")
    env = cpu_devices_env(8)
    r = subprocess.run([sys.executable, "-c", f"OUT = {out!r}\n" + SCRIPT], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    import json

    return dict(np.load(out + ".npz")), json.load(open(out + ".json"))


_ns: dict = {}
exec(COMMON, _ns)


def test_qtensor_keeps_its_metadata_across_shard_map(eight):
    _, rep = eight
    assert rep["dequant_equal"] and rep["quant_equal"]
    assert rep["local_shape"] == [256, 12] and rep["global_shape"] == [256, 96]  # 96 columns over 8 devices
    # codes (256·4/32 = 32 words) and scales (4 groups) split by output column like the kernel
    assert rep["codes_shards"] == [[32, 24]] and rep["scale_shards"] == [[4, 24]]


def test_import_sizes_the_cpu_thread_pool_for_fake_devices(eight):
    """``import jquant`` set ``NPROC`` = 8 devices + cores in the 8-device subprocess (without it
    XLA:CPU's collectives deadlocked there: 2 of 4 runs under load); it never overrides a user's value."""
    _, rep = eight
    assert rep["nproc"] == str(8 + (os.cpu_count() or 1))
    from jquant import _xla_cpu

    flags = "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=16"
    env = {"XLA_FLAGS": flags}
    assert _xla_cpu.guard(env) == 16 + (os.cpu_count() or 1) and env["NPROC"] == str(16 + (os.cpu_count() or 1))
    for env in ({"XLA_FLAGS": flags, "NPROC": "3"}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, {}):
        before = dict(env)
        assert _xla_cpu.guard(env) is None and env == before


def test_make_mesh_warns_when_the_cpu_pool_is_too_small(monkeypatch):
    from types import SimpleNamespace

    cores = os.cpu_count() or 1
    devs = [SimpleNamespace(platform="cpu", process_index=0) for _ in range(cores + 1)]
    monkeypatch.delenv("NPROC", raising=False)
    with pytest.warns(RuntimeWarning, match=f"set NPROC={2 * cores + 1}"):
        dist._warn_cpu_pool(devs)
    monkeypatch.setenv("NPROC", "64")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist._warn_cpu_pool(devs)
        dist._warn_cpu_pool(devs[:cores])


def test_qtensor_sharding_errors_name_the_problem(eight):
    _, rep = eight
    assert rep["grouped_axis"].startswith("SpecError") and "output axis" in rep["grouped_axis"]
    assert rep["indivisible"].startswith("ShapeError") and "size 90" in rep["indivisible"] \
        and "4 devices" in rep["indivisible"]


def test_data_parallel_statistics_equal_one_device(eight):
    arrays, _ = eight
    _, _, X = _ns["problem"]()
    one = stats.collect(("act_abs_max", "act_abs_mean", "act_sq_mean", "hessian"),
                        [X[b:b + 512] for b in range(0, len(X), 512)])
    x64 = X.astype(np.float64)
    np.testing.assert_array_equal(arrays["stat_act_abs_max"], np.asarray(one["act_abs_max"]))  # max: order-free
    np.testing.assert_allclose(arrays["stat_act_abs_max"], np.abs(x64).max(0), rtol=1e-7)
    for k, ref in [("act_abs_mean", np.abs(x64).mean(0)), ("act_sq_mean", (x64 ** 2).mean(0)),
                   ("hessian", 2 * x64.T @ x64 / len(x64))]:
        np.testing.assert_allclose(arrays["stat_" + k], np.asarray(one[k]), rtol=2e-5, atol=1e-4, err_msg=k)
        np.testing.assert_allclose(arrays["stat_" + k], ref, rtol=1e-4, atol=1e-3, err_msg=k)


def test_sharded_gptq_solve_equals_one_device(eight):
    arrays, rep = eight
    w, H, _ = _ns["problem"]()
    for name, spec in _ns["GPTQ_SPECS"].items():
        q, info = gptq.gptq_quantize(w, H, spec)
        assert rep["gptq_shape_" + name] == [256, 100]  # padding dropped
        np.testing.assert_array_equal(arrays["gptq_" + name], np.asarray(q.codes), err_msg=name)
        np.testing.assert_array_equal(arrays["gptq_scale_" + name], np.asarray(q.scale, np.float32), err_msg=name)
        assert abs(float(arrays["gptq_loss_" + name]) - info.loss) <= 1e-5 * info.loss  # psum order only


def test_pipeline_on_a_mesh_equals_one_device(eight):
    """GPTQ with act-order, AWQ (its search runs the stages too) and outliers (act_abs_max),
    batches over 'data' and GPTQ columns over all devices: every code as on one device."""
    arrays, _ = eight
    model, toks = _ns["tiny"]()
    state, logs = calibrate.quantize_model(model, toks, _ns["RULES"], batch_size=8, progress=False)
    codes = _ns["codes_of"](state)
    assert len(codes) == 14
    recon = np.array([e.recon if e.recon is not None else np.nan for e in logs])
    for m in ("data=8", "data=2,model=4"):
        for k, v in codes.items():
            np.testing.assert_array_equal(arrays[f"{m}|{k}"], v, err_msg=f"{m} {k}")
        np.testing.assert_allclose(arrays[m + "|recon"], recon, rtol=1e-4, equal_nan=True)


def test_quantized_forward_with_kernels_split_by_column(eight):
    arrays, rep = eight
    model, toks = _ns["tiny"]()
    state, _ = calibrate.quantize_model(model, toks, _ns["RULES"], batch_size=8, progress=False)
    from flax import nnx

    from jquant.models import forward

    gd, _ = nnx.split(model)
    ref = np.asarray(forward(gd, state, jnp.asarray(toks[:2]))[0])
    assert rep["sharded_q_codes"] == "P(None, 'model')"
    np.testing.assert_allclose(arrays["sharded_logits"], ref, rtol=1e-5, atol=1e-5)


def test_make_mesh_and_its_errors():
    n = jax.device_count()
    mesh = dist.make_mesh()
    assert mesh.axis_names == ("data", "model") and mesh.shape["data"] == n
    assert dist.make_mesh("model=-1").shape["model"] == n
    assert dist.parse_mesh("data=2, model=4") == {"data": 2, "model": 4}
    for bad, words in [("data=2,model=4", "valid meshes"), ("pipe=2", "unknown axis"), ("data=x", "integer"),
                       ("data=0", ">= 1"), ("data", "axis=size"), ("data=1,data=1", "twice"),
                       ("data=-1,model=-1", "at most one")]:
        if bad == "data=2,model=4" and n == 8:
            continue
        with pytest.raises(SpecError, match=words):
            dist.make_mesh(bad)


def test_batch_size_must_divide_over_the_data_axis():
    class FakeMesh:  # only its axis sizes are read before any work
        shape = {"data": 4, "model": 1}

    model, toks = _ns["tiny"]()
    with pytest.raises(DataError, match="multiple of 4"):
        calibrate.quantize_model(model, toks, _ns["RULES"], batch_size=6, progress=False, mesh=FakeMesh())
    with pytest.raises(DataError, match="last calibration batch holds 2"):
        calibrate.quantize_model(model, toks[:10], _ns["RULES"], batch_size=8, progress=False, mesh=FakeMesh())


def test_initialize_without_a_cluster_is_a_no_op(monkeypatch):
    for k in ("JQUANT_COORDINATOR", "JQUANT_NUM_PROCESSES", "JQUANT_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert dist.initialize() is False
    monkeypatch.setenv("JQUANT_NUM_PROCESSES", "two")
    with pytest.raises(SpecError, match="JQUANT_NUM_PROCESSES='two'"):
        dist.initialize()
    monkeypatch.setenv("JQUANT_NUM_PROCESSES", "2")
    monkeypatch.setenv("JQUANT_PROCESS_ID", "2")
    with pytest.raises(SpecError, match=r"\[0, 2\)"):
        dist.initialize()
    assert dist.is_writer()


TWO_PROCESS = COMMON + """
import os, sys
from jquant import distributed as dist
assert dist.initialize()  # from JQUANT_COORDINATOR / JQUANT_NUM_PROCESSES / JQUANT_PROCESS_ID
from jquant import calibrate, checkpoint
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
if not dist.is_writer():  # exactly one process writes: the other must never reach a writer
    def refuse(*a, **k):
        raise AssertionError("process 1 wrote a file")
    calibrate.write_json = calibrate.write_npy = checkpoint.save = refuse
model, toks = tiny()
for run in range(2):  # the second run resumes from the files process 0 wrote
    state, logs = calibrate.quantize_model(model, toks, RULES, batch_size=8, progress=False,
                                           mesh=dist.make_mesh("data=4,model=2"), work_dir=WORK, checkpoint_every=0)
    np.savez(f"{WORK}/codes{jax.process_index()}_{run}.npz", **codes_of(state))
"""


def test_two_processes_equal_one_process(tmp_path, cpu_devices_env):
    """``jax.distributed`` on localhost, 2 processes × 4 CPU devices, gloo collectives: the
    pipeline (statistics over 'data' across processes, GPTQ columns over all 8 devices)
    gives every process the single-process codes, and a second run resumes from process 0's files."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    work = str(tmp_path / "work")
    procs = []
    for pid in range(2):
        env = cpu_devices_env(4, JQUANT_COORDINATOR=f"localhost:{port}", JQUANT_NUM_PROCESSES="2",
                              JQUANT_PROCESS_ID=str(pid))
        log = open(tmp_path / f"p{pid}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", f"WORK = {work!r}\n" + TWO_PROCESS], env=env,
                                       cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for p, _ in procs:
            p.wait(timeout=900)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = {pid: "\n".join(l for l in (tmp_path / f"p{pid}.log").read_text().splitlines() if "Gloo" not in l)
            for pid in range(2)}
    assert all(p.returncode == 0 for p, _ in procs), "\n".join(
        f"--- process {pid} (exit {p.returncode}):\n{logs[pid][-3000:]}" for pid, (p, _) in enumerate(procs))
    assert os.path.isfile(os.path.join(work, "progress.json"))
    model, toks = _ns["tiny"]()
    state, _ = calibrate.quantize_model(model, toks, _ns["RULES"], batch_size=8, progress=False)
    expect = _ns["codes_of"](state)
    for pid in range(2):
        for run in range(2):
            got = dict(np.load(os.path.join(work, f"codes{pid}_{run}.npz")))
            assert sorted(got) == sorted(expect)
            for k, v in expect.items():
                np.testing.assert_array_equal(got[k], v, err_msg=f"process {pid} run {run} {k}")


def test_a_second_job_on_the_same_work_dir_is_refused(tmp_path):
    """Two jobs writing one resume point would corrupt it: the second gets a CheckpointError
    naming the holder, the first's files are untouched, and the lock goes with the first job."""
    from jquant.errors import CheckpointError

    work = str(tmp_path / "work")
    os.makedirs(work)
    holder = calibrate._lock(work)
    model, toks = _ns["tiny"]()
    with pytest.raises(CheckpointError, match=f"another calibration job \\(pid {os.getpid()}"):
        calibrate.quantize_model(model, toks, _ns["RULES"][:1], batch_size=8, progress=False, work_dir=work)
    assert sorted(os.listdir(work)) == ["lock"]
    holder.close()
    calibrate.quantize_model(model, toks, [(r"q_proj/kernel$", _ns["RULES"][0][1])], batch_size=8, progress=False,
                             work_dir=work)
    assert os.path.isfile(os.path.join(work, "progress.json"))
    calibrate._lock(work).close()  # released when the job returned


def test_processes_that_see_different_resume_points_are_refused(tmp_path, monkeypatch):
    """A work_dir on each host's own disk: process 1 sees no resume point where process 0 sees
    block 0 finished; resuming from different points would hang or mix models, so it is an error."""
    from jquant import distributed
    from jquant.errors import CheckpointError

    model, toks = _ns["tiny"]()
    work = str(tmp_path / "work")
    calibrate.quantize_model(model, toks, _ns["RULES"][:1], batch_size=8, progress=False, work_dir=work)
    monkeypatch.setattr(distributed, "every_process", lambda v: [v, -1])
    with pytest.raises(CheckpointError, match=r"different resume points .*\[1, -1\].*every process shares"):
        calibrate.quantize_model(model, toks, _ns["RULES"][:1], batch_size=8, progress=False, work_dir=work)
    monkeypatch.setattr(distributed, "every_process", lambda v: [v, -2])
    with pytest.raises(CheckpointError, match=r"process\(es\) \[1\] could not read"):
        calibrate.quantize_model(model, toks, _ns["RULES"][:1], batch_size=8, progress=False, work_dir=work)
