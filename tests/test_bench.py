"""Smoke tests of the accuracy harness and the EntropyCache calibration script at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dengine.bench import accuracy
from dengine.training import train

TINY = ["--steps", "2", "--warmup", "1", "--batch-size", "2", "--hidden", "32", "--layers", "1", "--heads", "2",
        "--kv-heads", "1", "--intermediate", "48", "--gen-length", "128"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for family in ("llada", "dream"):
        train.main(["--family", family, "--out", str(root / family), *TINY])
    return root


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_accuracy_harness_reports_every_policy(tiny_models, family, tmp_path, capsys):
    out = tmp_path / "result.json"
    accuracy.main(["--model", str(tiny_models / family), "--n", "4", "--gen-length", "128", "--block-length", "32",
                   "--policies", "none", 'entropy:{"tau": 0.5, "k": 4}', "dual", "--json", str(out), "--no-tqdm",
                   "--dtype", "float32"])
    record = json.loads(out.read_text())
    results = record["results"]
    assert [r["policy"] for r in results] == ["none", "entropy", "dual"]
    assert results[0]["speedup"] == 1.0 and results[1]["cache_config"] == {"tau": 0.5, "k": 4}
    for r in results:
        assert r["n"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and r["nfe"] == 128 and r["tokens_per_s"] > 0
    assert results[0]["full_recompute_rate"] == 1.0 and results[2]["full_recompute_rate"] < 1.0
    assert "| policy |" in capsys.readouterr().out


def test_calibration_script_picks_a_setting(tiny_models, tmp_path, capsys):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "calibrate_entropy.py"
    spec = importlib.util.spec_from_file_location("calibrate_entropy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--model", str(tiny_models / "llada"), "--n", "3", "--taus", "0", "1e9", "--ks", "2",
                 "--gen-length", "128", "--block-length", "32", "--tolerance", "100", "--dtype", "float32",
                 "--json", str(tmp_path / "c.json")])
    printed = capsys.readouterr().out
    assert "fastest within 100.0 points" in printed
    results = json.loads((tmp_path / "c.json").read_text())["results"]
    assert [r["cache_config"] for r in results] == [None, {"tau": 0.0, "k": 2}, {"tau": 1e9, "k": 2}]
    assert results[1]["full_recompute_rate"] == 1.0 and results[2]["full_recompute_rate"] < 0.1


def test_missing_embedded_model_is_a_clear_error(monkeypatch, tmp_path):
    import dengine.assets as assets

    monkeypatch.setitem(assets.EMBEDDED_MODELS, "llada-reverse", tmp_path / "absent")
    with pytest.raises(ValueError, match="embedded model 'llada-reverse' is not part of this build"):
        assets.resolve_model(None)
    assert assets.resolve_model(tmp_path) == tmp_path
