"""The main job end to end on the real default model, kept cheap: quantize with a recipe
through the CLI, restore the checkpoint, and evaluate float vs quantized on real text."""

import json
import os

import pytest

from jquant import cli

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def rtn_job(tmp_path_factory):
    """The main job's recipe, quantized and evaluated on held-out pydoc (2 windows of 128)."""
    out = str(tmp_path_factory.mktemp("main") / "run")
    assert cli.main(["quantize", "--recipe", "rtn_w4_g64", "--out", out, "--quiet"]) == 0
    assert cli.main(["eval", out, "--text", "pydoc", "--seq-len", "128", "--max-windows", "2", "--quiet"]) == 0
    return out


def test_cli_quantize_and_eval_rtn_w4(rtn_job):
    out = rtn_job
    man = json.load(open(os.path.join(out, "jquant.json")))
    assert man["quantized_leaves"] == 7 * 30  # every linear of the 30 blocks; embedding and norms float
    assert abs(man["bits_per_weight_quantized"] - (4 + 16 / 64 + 8 / 64)) < 1e-9
    assert cli.main(["quantize", "--recipe", "rtn_w4_g64", "--out", out, "--quiet"]) == 2  # no silent overwrite
    res = json.load(open(os.path.join(out, "eval_pydoc.json")))
    assert res["tokens"] == 2 * 127
    # A working 135M model on held-out Python documentation; 4-bit costs some but not all of it.
    assert 2.0 < res["float_ppl"] < 40.0, res
    assert res["float_ppl"] < res["quant_ppl"] < 2.0 * res["float_ppl"], res
    assert 0.0 < res["kl"] < 1.0 and 0.5 < res["top1"] <= 1.0, res


def test_a_job_killed_while_saving_is_finished_by_the_next_run(rtn_job, tmp_path, capsys):
    """params/ without jquant.json (killed between the two writes) is an unfinished job: the
    next run without --overwrite finishes it instead of refusing; the earlier evaluation, of
    other parameters, does not survive into the new directory."""
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(rtn_job, out)
    os.remove(os.path.join(out, "jquant.json"))
    assert os.path.isfile(os.path.join(out, "eval_pydoc.json"))
    assert cli.main(["quantize", "--recipe", "rtn_w4_g64", "--out", out, "--quiet"]) == 0
    assert "did not finish" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(out, "jquant.json")) and not os.path.exists(os.path.join(out, "eval_pydoc.json"))
    assert cli.main(["quantize", "--recipe", "rtn_w4_g64", "--out", out, "--quiet"]) == 2  # finished: refused


def test_eval_without_quantize_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "run `jquant quantize" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hqq_job(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hqq") / "hqq")
    assert cli.main(["quantize", "--recipe", "hqq_w3_g64", "--out", out, "--quiet"]) == 0
    assert cli.main(["eval", out, "--text", "pydoc", "--seq-len", "128", "--max-windows", "2", "--quiet"]) == 0
    return out


def test_cli_hqq_recipe_eval_on_a_file_and_bad_arguments(hqq_job, tmp_path, capsys):
    """A data-free HQQ recipe end to end; a text file given by absolute path; arguments that
    cannot serve are refused before any work instead of being replaced or crashing late."""
    from jquant import data

    out = hqq_job
    man = json.load(open(os.path.join(out, "jquant.json")))
    assert man["quantized_leaves"] == 7 * 30 and abs(man["bits_per_weight_quantized"] - 3.375) < 1e-9
    text = tmp_path / "my text.txt"
    text.write_text(data.load_text("licenses")[:40000])
    assert cli.main(["eval", out, "--text", str(text), "--seq-len", "128", "--max-windows", "2", "--quiet"]) == 0
    res = json.load(open(os.path.join(out, "eval_my_text.json")))
    assert res["tokens"] == 2 * 127 and res["float_ppl"] < res["quant_ppl"]
    printed = capsys.readouterr().out
    assert "hqq_w3_g64" in printed and "float32" in printed
    for bad in (["--max-windows", "-1"], ["--batch-size", "0"], ["--seq-len", "1"]):
        assert cli.main(["eval", out, *bad]) == 2
    assert "must be >=" in capsys.readouterr().err
    f = tmp_path / "a_file"
    f.write_text("x")
    assert cli.main(["quantize", "--out", str(f), "--quiet"]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert cli.main(["quantize", "--recipe", "gptq_w4_g64", "--out", str(tmp_path / "g"), "--calib-windows", "0",
                     "--quiet"]) == 1
    assert "calibration windows=0 must be >= 1" in capsys.readouterr().err


def test_report_and_compare_of_real_jobs(rtn_job, hqq_job, tmp_path, browser, capsys):
    """`jquant report` of the main job's output opens in headless Chromium with every image
    loaded and the quality table holding eval_pydoc.json's numbers; the figures measure the
    real checkpoint (every linear, its activations); `jquant compare` draws both jobs."""
    from jquant import report

    assert cli.main(["report", rtn_job, "--windows", "2", "--seq-len", "64", "--quiet"]) == 0
    page = browser(os.path.join(rtn_job, "report", "index.html"))
    assert page.images == {f: True for f in ("layers.png", "worst_weights.png", "activations.png", "bits.png",
                                             "time.png")}, page.images
    res = json.load(open(os.path.join(rtn_job, "eval_pydoc.json")))
    rows = {r[0]: r for r in page.tables["quality"][1:]}
    assert rows["rtn_w4_g64"][3] == f"{res['quant_ppl']:.3f}" and rows["float (float32)"][3] == f"{res['float_ppl']:.3f}"
    assert rows["rtn_w4_g64"][5] == f"{res['kl']:.4f}" and rows["rtn_w4_g64"][7] == "4.375"
    assert len(page.tables["layers"]) == 13  # the 12 worst linears
    # the analysis behind the figures, against the checkpoint itself
    man = json.load(open(os.path.join(rtn_job, "jquant.json")))
    a = report.analyse(rtn_job, man, windows=2, seq_len=64)
    assert len(a["linears"]) == 7 * 30 and all(0 < s.weight_err < 0.05 for s in a["linears"])
    assert all(s.act_max.shape == s.act_mean.shape and (s.act_max >= s.act_mean).all() for s in a["linears"])
    # bits by part add up to the manifest's size: codes 4 bits, scales and zeros 16 and 8 bits per 64 weights
    assert sum(a["parts"].values()) == man["quant_param_bytes"] and a["params"] == man["params"]
    p = a["parts"]  # per 64 weights: 32 bytes of codes, a float16 scale, an 8-bit zero
    assert p["codes"] == 16 * p["scales"] == 32 * p["zeros"] and p["indices"] == p["outliers"] == 0
    cmp_dir = str(tmp_path / "cmp")
    assert cli.main(["compare", rtn_job, hqq_job, "--out", cmp_dir]) == 0
    assert "on pydoc" in capsys.readouterr().out
    page = browser(os.path.join(cmp_dir, "index.html"))
    assert page.images == {"compare.png": True}
    assert [r[0] for r in page.tables["compare"][1:]] == ["hqq_w3_g64", "rtn_w4_g64"]


@pytest.mark.slow  # kept out of the default run for time; run with -m slow
def test_cli_rotation_and_w4a4kv4_recipe(tmp_path):
    """A recipe with a rotation and activation/KV quantizers through quantize and eval: the
    rotated checkpoint (its untied lm_head included) restores, the quantizers are applied at
    evaluation, and the Hadamard rotation makes W4A4KV4 far better than no rotation."""
    import yaml

    from jquant import recipes

    base = recipes.load_recipe("quarot_w4a4kv4").to_dict()
    base["rules"][0]["spec"] = {"format": "int", "bits": 4, "granularity": "channel", "symmetric": True}  # RTN: fast
    base.pop("calibration")
    kl = {}
    for rot in (True, False):
        d = dict(base, name=f"rot_{rot}")
        if not rot:
            d.pop("rotation")
        path = tmp_path / f"r{rot}.yaml"
        path.write_text(yaml.safe_dump(d))
        out = str(tmp_path / f"o{rot}")
        assert cli.main(["quantize", "--recipe", str(path), "--out", out, "--quiet"]) == 0
        man = json.load(open(os.path.join(out, "jquant.json")))
        assert (man["recipe"].get("rotation") is not None) == rot and man["quantized_leaves"] == 7 * 30
        assert cli.main(["eval", out, "--text", "licenses", "--seq-len", "128", "--max-windows", "2", "--quiet"]) == 0
        kl[rot] = json.load(open(os.path.join(out, "eval_licenses.json")))["kl"]
    assert kl[True] < 0.7 * kl[False], kl
