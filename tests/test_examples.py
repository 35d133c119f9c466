"""Every script in examples/ runs as a user runs it (a subprocess) on a tiny Llama with a
trained byte-level BPE tokenizer, and prints the numbers it promises."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("torch")  # the examples' checkpoint is written by transformers (tiny_llama_dir)
pytest.importorskip("transformers")


def run(name, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 04 asks for 8 CPU devices itself
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_examples_are_short_and_all_tested():
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))
    tested = re.findall(r'run\("(\d\d_\w+\.py)"', open(__file__).read())
    assert names == sorted(set(tested)), (names, tested)
    for f in names:
        assert len(open(os.path.join(ROOT, "examples", f)).read().splitlines()) <= 80, f


def test_01_params_tree():
    out = run("01_params_tree.py", "--width", "128", "--group-size", "32")
    err = {m[0]: float(m[1]) for m in re.findall(r"^(RTN|GPTQ) .*relative output error ([\d.e+-]+)", out, re.M)}
    assert set(err) == {"RTN", "GPTQ"} and 0 < err["GPTQ"] < err["RTN"] < 1, out
    assert "dense1/kernel" in out and "2/4 quantized" in out


def test_02_quantize_and_generate(tiny_llama_dir):
    model, text = tiny_llama_dir
    out = run("02_quantize_and_generate.py", "--model", model, "--text", text, "--seq-len", "64", "--windows", "2",
              "--new-tokens", "5", "--prompt", "def f(x):")
    ppl = [float(x) for x in re.findall(r"perplexity on .*: ([\d.]+)$", out, re.M)]
    assert len(ppl) == 2 and all(np.isfinite(ppl)), out
    assert "4.375 bits/weight on 14 quantized leaves" in out
    assert re.search(r"^rtn_w4_g64: '.*'$", out, re.M), out


def test_03_calibrate_on_your_text(tiny_llama_dir):
    model, text = tiny_llama_dir
    out = run("03_calibrate_on_your_text.py", "--model", model, "--text", text, "--other-text", "licenses",
              "--windows", "8", "--seq-len", "64", "--eval-windows", "2", "--group-size", "32")
    assert "GPTQ on 8 windows of 64 tokens: 14 linears" in out
    rows = {m[0].strip(): (float(m[1]), float(m[2])) for m in re.findall(r"^(float|RTN W4|GPTQ W4)\s+([\d.]+)\s+([\d.]+)$",
                                                                          out, re.M)}
    assert set(rows) == {"float", "RTN W4", "GPTQ W4"}, out


def test_04_orbax_mesh(tiny_llama_dir, tmp_path):
    model, _ = tiny_llama_dir
    out = run("04_orbax_mesh.py", "--model", model, "--out", str(tmp_path / "ck"), "--mesh", "data=2,model=4")
    assert "mesh {'data': 2, 'model': 4}" in out and "same next tokens: True" in out, out
    assert float(re.search(r"max \|diff\| ([\d.e+-]+)", out)[1]) < 1e-4
    assert re.search(r"codes \((\d+), (\d+)\) are held as \(\1, (\d+)\)", out), out


def test_05_rotations_w4a4(tiny_llama_dir):
    model, text = tiny_llama_dir
    out = run("05_rotations_w4a4.py", "--model", model, "--text", text, "--seq-len", "64", "--windows", "2")
    kl = re.findall(r"^(W4A4|QuaRot W4A4)\s+on 14 linears: perplexity [\d.]+ \(float [\d.]+\), KL ([\d.]+)", out, re.M)
    assert [k[0] for k in kl] == ["W4A4", "QuaRot W4A4"], out


def test_06_qat(tiny_llama_dir, tmp_path):
    model, text = tiny_llama_dir
    args = ["--model", model, "--train-text", text, "--eval-text", text, "--steps", "3", "--windows", "8",
            "--seq-len", "32", "--eval-windows", "2", "--work-dir", str(tmp_path / "qat")]
    out = run("06_qat.py", *args)
    assert re.search(r"QAT: loss [\d.]+ -> [\d.]+ in 3 steps", out), out
    assert re.search(r"^QAT\s+perplexity on .*\(2\.\d+ bits/weight on the linears\)", out, re.M), out
    again = run("06_qat.py", *args)  # resumed from the work dir: the same result
    assert again.splitlines()[-1] == out.splitlines()[-1]


def test_07_export(tiny_llama_dir, tmp_path):
    model, _ = tiny_llama_dir
    out = run("07_export.py", "--model", model, "--out", str(tmp_path))
    diffs = [float(x) for x in re.findall(r"max \|logit diff\| ([\d.e+-]+), same next tokens True", out)]
    assert len(diffs) == 3 and max(diffs) < 1e-3, out
    assert os.path.isfile(tmp_path / "model-gguf.gguf")
