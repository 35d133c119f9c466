"""A QAT recipe through `jquant quantize` on the real default model (two steps: the plumbing;
quality is measured by benchmarks/qat.py). Slow (3 minutes here, most of it compiling the
30-block training step); the default run checks the same plumbing on a small checkpoint on
disk (tests/qat/test_cli.py)."""

import json
import os

import pytest
import yaml

from jquant import cli

pytestmark = pytest.mark.realmodel


@pytest.mark.slow
def test_cli_qat_recipe_trains_resumes_and_saves(tmp_path):
    """From HQQ's result (a data-free method's QTensors start the training), with held-out
    perplexity every 2 steps."""
    recipe = {"name": "qat_tiny", "calibration": {"text": "pydoc", "windows": 4, "seq_len": 64},
              "rules": [{"pattern": "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$",
                         "spec": {"method": "hqq", "bits": 3, "group_size": 64, "symmetric": False}}],
              "qat": {"steps": 2, "batch_size": 2, "learning_rate": 1e-5, "scale_learning_rate": 1e-4,
                      "checkpoint_every": 1, "eval_every": 2}}
    path = tmp_path / "qat_tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "run")
    assert cli.main(["quantize", "--recipe", str(path), "--out", out, "--quiet"]) == 0
    man = json.load(open(os.path.join(out, "jquant.json")))
    assert man["quantized_leaves"] == 7 * 30 and man["seconds"]["qat"] > 0
    info = json.load(open(os.path.join(out, "layers.json")))
    assert len(info["qat"]["losses"]) == 2 and all(x > 0 for x in info["qat"]["losses"])
    # eval_every: held-out pydoc perplexity at step 2; the start was HQQ's result, not RTN's
    assert [e[0] for e in info["qat"]["evals"]] == [2] and info["qat"]["evals"][0][1] > 1
    assert os.path.exists(os.path.join(out, "qat", "qat_progress.json"))
    assert cli.main(["eval", out, "--text", "licenses", "--seq-len", "128", "--max-windows", "1", "--quiet"]) == 0
    res = json.load(open(os.path.join(out, "eval_licenses.json")))
    assert res["float_ppl"] < res["quant_ppl"] < 3 * res["float_ppl"]
