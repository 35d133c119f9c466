"""BitNet's layouts through the CLI on a small Hugging Face checkpoint: the post-training
recipe (ternary absmean weights per tensor, 8-bit absmax activations per token) and the QAT
recipe that trains the model into the same layout (straight-through estimator)."""

import json
import os

import jax
import numpy as np
import yaml

import jquant as jq
from jquant import cli, recipes
from jquant.qtensor import is_qtensor

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _run(tiny_llama_dir, tmp_path, name, **override):
    model, text = tiny_llama_dir
    doc = recipes.load_recipe(name).to_dict()
    doc.update(name=f"{name}_tiny", calibration={"text": text, "windows": 8, "seq_len": 64}, **override)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = str(tmp_path / name)
    assert cli.main(["quantize", "--model", model, "--recipe", str(path), "--out", out, "--quiet"]) == 0
    assert cli.main(["eval", out, "--text", text, "--seq-len", "64", "--max-windows", "8", "--quiet"]) == 0
    return out, json.load(open(os.path.join(out, "eval_text.json")))


def _ternary_kernels(out):
    q = jq.restore(os.path.join(out, "params"))
    leaves = {jq.spec.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=is_qtensor)[0]}
    kernels = {p: x for p, x in leaves.items() if p.endswith("/kernel") and p.split("/")[-2] in LINEAR}
    assert len(kernels) == 7 * 2 and all(is_qtensor(x) for x in kernels.values())
    for p, x in kernels.items():
        w = np.asarray(x.dequantize(np.float32), np.float64)
        gamma = np.unique(np.abs(w[w != 0]))
        assert len(gamma) == 1, p  # one absmean scale per tensor: every weight is 0 or ±γ
        assert x.grid.fmt == "ternary" and x.granularity == "tensor"
    return kernels


def test_bitnet_ternary_post_training_and_qat(tiny_llama_dir, tmp_path):
    ptq, ptq_eval = _run(tiny_llama_dir, tmp_path, "bitnet_ternary")
    man = json.load(open(os.path.join(ptq, "jquant.json")))
    assert man["recipe"]["activations"]  # 8-bit activations are part of the job, and of its evaluation
    assert 2.0 < man["bits_per_weight_quantized"] < 2.01  # 2-bit codes, one scale per tensor
    _ternary_kernels(ptq)

    qat, qat_eval = _run(tiny_llama_dir, tmp_path, "bitnet_ternary_qat",
                         qat={"steps": 12, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 2,
                              "objective": "kl", "checkpoint_every": 0})
    _ternary_kernels(qat)
    info = json.load(open(os.path.join(qat, "layers.json")))
    losses = info["qat"]["losses"]
    assert len(losses) == 12 and losses[-1] < losses[0]
    # Training into the layout beats rounding into it, on the held-out windows of eval.
    assert qat_eval["kl"] < 0.9 * ptq_eval["kl"], (qat_eval["kl"], ptq_eval["kl"])
