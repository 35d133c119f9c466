"""A QAT recipe through `jquant quantize` on a small Hugging Face checkpoint on disk: the
plumbing of the CLI's training stage (the same on the real default model: the slow test in
tests/realmodel/test_qat_cli.py; quality: benchmarks/qat.py)."""

import json
import os

import yaml

from jquant import cli


def test_cli_qat_recipe_trains_resumes_and_saves(tiny_llama_dir, tmp_path, capsys):
    """From HQQ's result (a data-free method's QTensors start the training), with held-out
    perplexity every 2 steps and a checkpoint every step; a second run finds the finished job."""
    model, text = tiny_llama_dir
    recipe = {"name": "qat_tiny", "calibration": {"text": text, "windows": 4, "seq_len": 32},
              "rules": [{"pattern": "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$",
                         "spec": {"method": "hqq", "bits": 3, "group_size": 32, "symmetric": False}}],
              "qat": {"steps": 2, "batch_size": 2, "learning_rate": 1e-5, "scale_learning_rate": 1e-4,
                      "checkpoint_every": 1, "eval_every": 2}}
    path = tmp_path / "qat_tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "run")
    assert cli.main(["quantize", "--model", model, "--recipe", str(path), "--out", out, "--quiet"]) == 0
    man = json.load(open(os.path.join(out, "jquant.json")))
    assert man["quantized_leaves"] == 7 * 2 and man["seconds"]["qat"] > 0
    assert abs(man["bits_per_weight_quantized"] - (3 + 24 / 32)) < 1e-9  # 24 bits of scale and zero per 32
    info = json.load(open(os.path.join(out, "layers.json")))
    assert len(info["qat"]["losses"]) == 2 and all(x > 0 for x in info["qat"]["losses"])
    assert [e[0] for e in info["qat"]["evals"]] == [2] and info["qat"]["evals"][0][1] > 1
    progress = json.load(open(os.path.join(out, "qat", "qat_progress.json")))
    assert progress["step"] == 2
    assert cli.main(["quantize", "--model", model, "--recipe", str(path), "--out", out, "--quiet"]) == 2
    assert cli.main(["eval", out, "--text", text, "--seq-len", "64", "--max-windows", "2", "--quiet"]) == 0
    res = json.load(open(os.path.join(out, "eval_text.json")))
    assert res["tokens"] == 2 * 63 and res["float_ppl"] > 1 and res["quant_ppl"] > 1 and 0 < res["kl"]
