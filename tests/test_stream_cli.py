"""`jquant quantize --stream`: the calibration job reads the decoder blocks from the model files
one at a time, and saves what the job with the model loaded whole saves."""

import json
import os

import jax
import numpy as np
import pytest
import yaml

import jquant as jq
from jquant import cli

LINEARS = "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"


def _leaves(d):
    q = jq.restore(os.path.join(d, "params"))
    return {jq.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=jq.is_qtensor)[0]}


def test_stream_saves_what_the_whole_model_job_saves(tiny_llama_dir, tmp_path, capsys):
    model, text = tiny_llama_dir
    recipe = {"name": "gptq_tiny", "calibration": {"text": text, "windows": 8, "seq_len": 64, "batch_size": 4},
              "rules": [{"pattern": LINEARS, "spec": {"method": "gptq", "bits": 4, "group_size": 32,
                                                      "symmetric": False, "options": {"act_order": True}}},
                        {"pattern": "embed_tokens/embedding$", "spec": {"bits": 8, "granularity": "channel",
                                                                       "axis": 1}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    whole, streamed = str(tmp_path / "whole"), str(tmp_path / "streamed")
    assert cli.main(["quantize", "--model", model, "--recipe", str(path), "--out", whole, "--quiet"]) == 0
    assert cli.main(["quantize", "--model", model, "--recipe", str(path), "--out", streamed, "--quiet",
                     "--stream"]) == 0
    a, b = _leaves(whole), _leaves(streamed)
    assert sorted(a) == sorted(b)
    for p in a:
        if jq.is_qtensor(a[p]):
            for part in ("codes", "scale", "zero", "g_idx"):
                x, y = getattr(a[p], part), getattr(b[p], part)
                assert (x is None) == (y is None)
                if x is not None:
                    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{p} {part}")
        else:
            np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]), err_msg=p)
    ma, mb = (json.load(open(os.path.join(d, "jquant.json"))) for d in (whole, streamed))
    assert ma["quantized_leaves"] == mb["quantized_leaves"] == 7 * 2 + 1
    assert ma["float_param_bytes"] == mb["float_param_bytes"]
    assert cli.main(["eval", streamed, "--text", text, "--seq-len", "64", "--max-windows", "2", "--quiet"]) == 0


@pytest.mark.parametrize("recipe, extra, match", [
    ("rtn_w4_g64", [], r"--stream: recipe 'rtn_w4_g64' is data-free"),
    ("gptq_w4_g64", ["--calib-text", "selfgen"], r"--stream: the calibration text 'selfgen' is written by the whole"),
    ("bitnet_ternary_qat", ["--calib-text", "pydoc"], r"--stream: recipe 'bitnet_ternary_qat' has a qat section"),
])
def test_stream_refuses_what_needs_the_whole_model(tiny_llama_dir, tmp_path, capsys, recipe, extra, match):
    model, _ = tiny_llama_dir
    assert cli.main(["quantize", "--model", model, "--recipe", recipe, "--out", str(tmp_path / "o"), "--stream",
                     "--quiet", *extra]) == 2
    import re

    assert re.search(match, capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "o" / "params")
