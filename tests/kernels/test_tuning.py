"""Tuning table lookup and the autotune helper (timed here in interpret mode on tiny shapes)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import random_qtensor

from pallas_kernels import Config, autotune, tuning, wq_matmul
from pallas_kernels.layout import KernelUnsupported, pick_bk


def test_defaults_by_regime():
    small = tuning.lookup("wq", 1, 8192, 8192, 4, device="none", table={})
    big = tuning.lookup("wq", 4096, 8192, 8192, 4, device="none", table={})
    assert small.bm == 16 and big.bm >= 64


def test_table_entries_take_precedence():
    table = {"devX": {"wq": [{"max_m": 16, "N": 4096, "K": None, "bits": 4, "config": {"bm": 16, "bn": 32,
                                                                                       "bk": 512, "num_warps": 2,
                                                                                       "num_stages": 5}}]}}
    assert tuning.lookup("wq", 8, 4096, 1024, 4, device="devX", table=table).bk == 512
    assert tuning.lookup("wq", 8, 2048, 1024, 4, device="devX", table=table).bk != 512  # other N
    assert tuning.lookup("wq", 32, 4096, 1024, 4, device="devX", table=table).bk != 512  # bigger M


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        Config(bm=24)
    with pytest.raises(ValueError, match="num_warps"):
        Config(num_warps=3)


def test_pick_bk():
    assert pick_bk(576, 64, 4, 256) == 64  # 576 = 9 * 64
    assert pick_bk(4096, 128, 4, 256) == 256
    assert pick_bk(4096, 32, 3, 256) == 256
    assert pick_bk(4096, 4096, 8, 128) == 128  # per-channel: any tile inside the one group
    with pytest.raises(KernelUnsupported):
        pick_bk(40, 40, 4, 64)  # no power-of-two tile of at least 16 divides 40


def test_autotune_writes_the_fastest(tmp_path):
    rng = np.random.default_rng(0)
    qt, _ = random_qtensor(rng, 128, 64, kind="asym_int", bits=4, group=32)
    x = jnp.asarray(rng.normal(size=(4, 128)), jnp.float32)
    cands = [Config(16, 32, 32, 4, 2), Config(16, 64, 64, 4, 2)]
    path = str(tmp_path / "t.json")
    best, results = autotune("wq", lambda c: (lambda: wq_matmul(x, qt, config=c, interpret=True)),
                             M=4, N=64, K=128, bits=4, configs=cands, reps=2, path=path, max_m=16)
    assert len(results) == 2 and best == min(results, key=lambda r: r[1])[0]
    table = json.load(open(path))
    (entry,) = table[tuning.device_kind()]["wq"]
    assert entry["max_m"] == 16 and Config(**entry["config"]) == best
    assert tuning.lookup("wq", 4, 64, 128, 4, table=table) == best
    # Rerunning replaces the entry rather than appending a duplicate.
    autotune("wq", lambda c: (lambda: wq_matmul(x, qt, config=c, interpret=True)), M=4, N=64, K=128, bits=4,
             configs=cands[:1], reps=1, path=path, max_m=16)
    assert len(json.load(open(path))[tuning.device_kind()]["wq"]) == 1
