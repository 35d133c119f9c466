"""The second real model, Gemma 3 270M (a Q4_K_M GGUF: Q4_K, Q6_K, Q5_0, Q8_0 and F32
tensors), against transformers on the same file, and the main job's CLI path on it."""

import json
import os

import numpy as np
import pytest

from jquant import cli

pytestmark = pytest.mark.realmodel
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def gemma_path():
    from jquant.models import gemma3_270m_path

    return gemma3_270m_path()


@pytest.mark.slow  # kept out of the default run for time; run with -m slow
def test_real_gemma3_logits_match_transformers(gemma_path):
    import jax.numpy as jnp
    import transformers

    from jquant.models import Gemma3, load

    model, config, tok = load("gemma3-270m")
    assert isinstance(model, Gemma3) and config.vocab_size == 262144 and config.num_hidden_layers == 18
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    text = "The quick brown fox jumps over the lazy dog. " * 60  # 600 tokens: past the 512-token window
    ids = tok(text, return_tensors="np")["input_ids"][:, :600]
    assert ids.shape[1] == 600
    ours = np.asarray(model(jnp.asarray(ids))[0])
    tm = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma_path.parent), gguf_file=gemma_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = tm(torch.as_tensor(ids)).logits.numpy()
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.999


def test_cli_quantize_and_eval_gemma3(tmp_path, capsys):
    out = str(tmp_path / "g")
    assert cli.main(["quantize", "--model", "gemma3-270m", "--recipe", "rtn_w4_g64", "--out", out, "--quiet"]) == 0
    man = json.load(open(os.path.join(out, "jquant.json")))
    assert man["quantized_leaves"] == 7 * 18 and man["model"].endswith("gemma-3-270m-q4_k_m.gguf")
    assert cli.main(["eval", out, "--text", "licenses", "--seq-len", "128", "--max-windows", "2", "--quiet"]) == 0
    res = json.load(open(os.path.join(out, "eval_licenses.json")))
    assert res["tokens"] == 2 * 127
    # A working model on legal text; 4 bits costs some of it.
    assert 2.0 < res["float_ppl"] < 60.0, res
    assert res["float_ppl"] < res["quant_ppl"] < 3.0 * res["float_ppl"], res
    assert 0.0 < res["kl"] < 2.0 and 0.3 < res["top1"] <= 1.0, res
