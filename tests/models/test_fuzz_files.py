"""A short fuzzing slice: mutated GGUF files, safetensors + config.json directories, recipe
YAML and Orbax checkpoints are either loaded correctly (a checkpoint: exactly the saved values) or refused with a ``jquant.errors`` error, never a crash, a
hang or a memory blow-up (each input runs in a worker under ``RLIMIT_AS`` and a time limit).

The long run is ``benchmarks/fuzz.py`` (>= 10,000 inputs per format); the mutations are shared
(``fuzz_cases.py``).
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzz_cases as fc  # noqa: E402

SLICE = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fc.make_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.fixture(scope="module")
def worker():
    w = fc.Worker(time_limit=30.0)
    yield w
    w.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_inputs")


@pytest.mark.parametrize("fmt", fc.FORMATS)
def test_seeds_load(seeds, worker, fmt):
    for s in seeds[fmt]:
        outcome, detail, _ = worker.run(fmt, s)
        assert outcome == "ok", (s, outcome, detail)


def _check(fmt, seeds, worker, workdir, data):
    draw = fc.HypothesisDraw(data)
    src = draw.pick(seeds[fmt])
    path = fc.mutate(fmt, src, workdir / f"input_{fmt}{src.suffix}", draw, _FIELDS)
    outcome, detail, _ = worker.run(fmt, path)
    assert outcome in ("ok", "error"), f"{outcome} on a mutated {src.name}:\n{detail}"


_FIELDS: dict = {}


@SLICE
@given(data=st.data())
def test_fuzz_gguf(seeds, worker, workdir, data):
    _check("gguf", seeds, worker, workdir, data)


@SLICE
@given(data=st.data())
def test_fuzz_safetensors(seeds, worker, workdir, data):
    _check("safetensors", seeds, worker, workdir, data)


@SLICE
@given(data=st.data())
def test_fuzz_recipe(seeds, worker, workdir, data):
    _check("recipe", seeds, worker, workdir, data)


@SLICE
@given(data=st.data())
def test_fuzz_orbax_checkpoint(seeds, worker, workdir, data):
    _check("orbax", seeds, worker, workdir, data)
