"""The report and compare pages from result files alone (no model): the numbers on the page
are the JSON's, every image decodes in a real headless browser, and bad input is refused
with nothing half-written. The real-model report is in tests/realmodel/test_main_job.py."""

import json
import os

import pytest

from jquant import cli, report
from jquant.errors import DataError


def _job(d, recipe="gptq_w4_g64", model="/models/m.gguf", bits=4.375, evals=(("fortunes", 40.0, 50.0),),
         layers=True):
    os.makedirs(d, exist_ok=True)
    man = {"model": model, "dtype": "float32", "recipe": {"name": recipe, "description": "test recipe"},
           "quantized_leaves": 4, "params": 1000, "float_param_bytes": 4000, "quant_param_bytes": 1000,
           "bits_per_weight_all": bits + 1.5, "bits_per_weight_quantized": bits, "checkpoint_bytes_on_disk": 2**20,
           "seconds": {"load": 1.5, "quantize": 12.25, "save": 0.5, "forward": 3.0, "solve": 7.0}}
    json.dump(man, open(os.path.join(d, "jquant.json"), "w"))
    for text, f, q in evals:
        json.dump({"text": text, "seq_len": 128, "windows": 2, "tokens": 254, "float_ppl": f, "quant_ppl": q,
                   "kl": 0.1234, "top1": 0.8125, "eval_seconds": 4.0, "manifest": man},
                  open(os.path.join(d, f"eval_{text}.json"), "w"))
    if layers:
        logs = [{"path": f"layers/{i}/{n}", "method": "gptq", "seconds": 0.1, "loss": 1.0,
                 "recon": 0.5 * (i + 1) * (1 + k), "recon_rtn": 2.0 * (i + 1) * (1 + k), "damp": 0.01, "extra": None}
                for i in range(3) for k, n in enumerate(("self_attn/q_proj", "mlp/down_proj"))]
        json.dump({"text": "pydoc", "windows": 8, "layers": logs}, open(os.path.join(d, "layers.json"), "w"))
    return str(d)


def test_report_from_results_shows_their_numbers(tmp_path, browser):
    check_page = browser
    out = _job(tmp_path / "job", evals=(("fortunes", 39.96, 50.165), ("pydoc", 10.5, 11.25)))
    path = report.write_report(out, model=False)
    assert path == os.path.join(out, "report", "index.html")
    assert sorted(os.listdir(os.path.dirname(path))) == ["index.html", "layers.png", "time.png"]
    page = check_page(path)
    assert page.images == {"layers.png": True, "time.png": True}, page.images
    q = page.tables["quality"]
    assert q[0] == report.QUALITY_HEADER
    rows = {(r[0], r[1]): r for r in q[1:]}
    assert rows[("gptq_w4_g64", "fortunes")][3:9] == ["50.165", f"{50.165 / 39.96:.4f}", "0.1234", "81.2", "4.375",
                                                      "5.875"]
    assert rows[("float (float32)", "fortunes")][3] == "39.960"
    assert rows[("gptq_w4_g64", "pydoc")][3] == "11.250" and rows[("float (float32)", "pydoc")][3] == "10.500"
    assert rows[("gptq_w4_g64", "fortunes")][10] == "1.0"  # MiB on disk
    layers = page.tables["layers"]
    assert layers[1][0] == "layers/2/mlp/down_proj" and layers[1][4] == "0.250"  # worst first; recon / RTN
    # a second report replaces the first
    assert report.write_report(out, model=False) == path


def test_report_of_a_training_job(tmp_path, browser):
    """QAT losses (layers.json's qat section) and learned rotations' losses get their curves."""
    import numpy as np

    out = _job(tmp_path / "job", layers=False)
    json.dump({"text": "selfgen", "qat": {"losses": [3.0, 2.5, 2.0], "evals": [[2, 55.0]], "tokens_per_second": 9}},
              open(os.path.join(out, "layers.json"), "w"))
    np.savez(os.path.join(out, "rotations.npz"), r1=np.eye(2), r2=np.eye(2), losses=np.array([4.0, 3.0]),
             key=np.asarray("k"))
    page = browser(report.write_report(out, model=False))
    assert page.images == {"training.png": True, "time.png": True}
    assert "Training loss by step" in page.text
    open(os.path.join(out, "rotations.npz"), "wb").write(b"junk")
    with pytest.raises(DataError, match="rotations.npz: cannot read"):
        report.write_report(out, model=False)


def test_report_without_evaluation_or_logs(tmp_path, browser):
    check_page = browser
    out = _job(tmp_path / "job", evals=(), layers=False)
    path = report.write_report(out, model=False)
    page = check_page(path)
    assert page.images == {"time.png": True} and "quality" not in page.tables
    assert "No evaluation yet" in page.text


def test_report_bad_input(tmp_path):
    with pytest.raises(DataError, match="holds no jquant.json.*jquant quantize"):
        report.write_report(str(tmp_path))
    with pytest.raises(DataError, match="not a directory"):
        report.write_report(str(tmp_path / "missing"))
    out = _job(tmp_path / "job")
    open(os.path.join(out, "eval_x.json"), "w").write("{not json")
    with pytest.raises(DataError, match="eval_x.json: the evaluation result is not valid JSON"):
        report.write_report(out, model=False)
    os.remove(os.path.join(out, "eval_x.json"))
    json.dump({"text": "x"}, open(os.path.join(out, "eval_x.json"), "w"))
    with pytest.raises(DataError, match="not an evaluation result"):
        report.write_report(out, model=False)
    os.remove(os.path.join(out, "eval_x.json"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot write the report"):
        report.write_report(out, str(blocker / "sub" / "report"), model=False)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("mine")
    with pytest.raises(DataError, match="exists"):
        report.write_report(out, str(existing), model=False, overwrite=False)
    assert os.listdir(existing) == ["keep"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".report-")]  # no staging left behind
    assert cli.main(["report", str(tmp_path / "nothing_here"), "--no-model"]) == 1
    assert cli.main(["report", out, "--windows", "0"]) == 2


def test_compare(tmp_path, capsys, browser):
    check_page = browser
    a = _job(tmp_path / "a", "rtn_w4_g64", bits=4.375, evals=(("fortunes", 40.0, 50.0), ("pydoc", 10.0, 11.0)))
    b = _job(tmp_path / "b", "rtn_w3_g64", bits=3.375, evals=(("fortunes", 40.0, 120.0),))
    c = _job(tmp_path / "c", "gptq_w3_g64", bits=3.375, evals=(("fortunes", 40.0, 80.0),))
    dest = str(tmp_path / "cmp")
    assert cli.main(["compare", a, b, c, "--out", dest]) == 0
    printed = capsys.readouterr().out
    assert "on fortunes" in printed and "rtn_w3_g64" in printed
    page = check_page(os.path.join(dest, "index.html"))
    assert page.images == {"compare.png": True}
    t = page.tables["compare"]
    assert [r[0] for r in t[1:]] == ["rtn_w3_g64", "gptq_w3_g64", "rtn_w4_g64"]  # by bits/weight
    assert [r[4] for r in t[1:]] == ["120.000", "80.000", "50.000"]
    saved = json.load(open(os.path.join(dest, "compare.json")))
    assert saved["text"] == "fortunes" and len(saved["rows"]) == 3

    with pytest.raises(DataError, match="two or more"):
        report.write_compare([a], dest)
    other = _job(tmp_path / "o", model="/models/other.gguf")
    with pytest.raises(DataError, match="different models.*other.gguf"):
        report.write_compare([a, other], dest)
    d = _job(tmp_path / "d", evals=(("licenses", 40.0, 50.0),))
    with pytest.raises(DataError, match="no evaluation text all directories share"):
        report.write_compare([a, d], dest)
    with pytest.raises(DataError, match="no evaluation on 'pydoc' in"):
        report.write_compare([a, b], dest, text="pydoc")
    e = _job(tmp_path / "e", evals=())
    with pytest.raises(DataError, match="no evaluation result.*jquant eval"):
        report.write_compare([a, e], dest)
    json.dump({**json.load(open(os.path.join(b, "eval_fortunes.json"))), "windows": 16},
              open(os.path.join(b, "eval_fortunes.json"), "w"))
    with pytest.raises(DataError, match="different window counts"):
        report.write_compare([a, b], dest)
    assert json.load(open(os.path.join(dest, "compare.json")))["text"] == "fortunes"  # untouched by the failures
