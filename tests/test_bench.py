"""Smoke tests of the accuracy harness and the EntropyCache calibration script at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts import load_script

from dengine.bench import accuracy
from dengine.tasks import get_task
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
    printed = capsys.readouterr()
    assert "| policy |" in printed.out
    progress = [line for line in printed.err.splitlines() if line.startswith("policy ")]  # --no-tqdm: a line each
    assert [line.split(":")[0] for line in progress] == ["policy 1/3 none", 'policy 2/3 entropy {"tau"',
                                                         "policy 3/3 dual"], progress


def test_accuracy_skip_starts_after_the_first_held_out_problems(tiny_models, tmp_path, capsys):
    out = tmp_path / "fresh.json"
    accuracy.main(["--model", str(tiny_models / "llada"), "--skip", "3", "--n", "2", "--gen-length", "64",
                   "--block-length", "32", "--policies", "none", "--json", str(out), "--no-tqdm", "--dtype", "float32"])
    record = json.loads(out.read_text())
    expected = get_task(record["task"]).held_out(5)[3:]
    assert record["skip"] == 3 and record["results"][0]["n"] == 2
    assert [s["question"] for s in record["results"][0]["samples"]] == [p.question for p in expected]
    with pytest.raises(SystemExit):
        accuracy.main(["--model", str(tmp_path / "absent"), "--skip", "-1"])
    assert "must be at least 0" in capsys.readouterr().err


def test_accuracy_takes_a_fixed_count_per_step_and_refuses_bad_mixes(tiny_models, tmp_path, capsys):
    out = tmp_path / "one"
    accuracy.main(["--model", str(tiny_models / "dream"), "--n", "2", "--gen-length", "64", "--block-length", "32",
                   "--policies", "none", "--tokens-per-step", "2", "--out", str(out), "--no-tqdm", "--dtype", "float32"])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sampler"]["tokens_per_step"] == 2 and record["results"][0]["nfe"] == 32  # 64 tokens, 2 a step
    for bad in (["--threshold", "0.9"], ["--steps", "64"]):  # refused before the model loads
        with pytest.raises(SystemExit):
            accuracy.main(["--model", str(tmp_path / "absent"), "--task", "digit-reversal", "--tokens-per-step", "1",
                           *bad])
        assert "tokens_per_step" in capsys.readouterr().err


def test_calibration_script_picks_a_setting(tiny_models, tmp_path, capsys):
    module = load_script("benchmarks/calibrate_entropy.py")
    module.main(["--model", str(tiny_models / "llada"), "--n", "3", "--taus", "0", "1e9", "--ks", "2",
                 "--baselines", "dual", "--samplers", "one-token", "--gen-length", "128", "--block-length", "32",
                 "--tolerance", "100", "--dtype", "float32", "--out", str(tmp_path / "c"), "--no-tqdm", "--plot"])
    printed = capsys.readouterr().out
    assert "least work within 100.0 points" in printed
    record = json.loads((tmp_path / "c.json").read_text())
    assert record["task"] == "digit-reversal"  # from the model folder's task.json
    results = record["runs"]["one-token"]
    assert [(r["policy"], r["cache_config"]) for r in results] == [
        ("none", None), ("dual", None), ("entropy", {"tau": 0.0, "k": 2}), ("entropy", {"tau": 1e9, "k": 2})]
    assert results[2]["full_recompute_rate"] == 1.0 and results[3]["full_recompute_rate"] < 0.1
    assert record["best"] == {"one-token": {"tau": 1e9, "k": 2}}  # every setting qualifies: the least work wins
    assert "least work within" in (tmp_path / "c.md").read_text() and (tmp_path / "c.png").stat().st_size > 0


def test_calibration_rule_by_hand():
    module = load_script("benchmarks/calibrate_entropy.py")

    result = accuracy_result
    none = result("none", None, 0.90, 80.0)
    cheap_wrong = result("entropy", {"tau": 1e9, "k": 0}, 0.50, 15.0)
    good = result("entropy", {"tau": 0.3, "k": 1}, 0.895, 20.0)
    tie_conservative = result("entropy", {"tau": 0.1, "k": 4}, 0.90, 20.5)  # within 5% of the work: a tie
    costly = result("entropy", {"tau": 0.01, "k": 8}, 0.90, 40.0)
    dual = result("dual", None, 0.99, 10.0)  # not an EntropyCache setting: never chosen
    results = [none, cheap_wrong, good, tie_conservative, costly, dual]
    assert module.best_setting(results, tolerance=0.01) is tie_conservative
    assert module.best_setting(results, tolerance=0.5) is cheap_wrong
    assert module.best_setting([none, cheap_wrong], tolerance=0.01) is None


def accuracy_result(policy, config, accuracy_value, work):
    return accuracy.PolicyResult(policy=policy, cache_config=config, n=100, accuracy=accuracy_value, wall_s=1.0,
                                 nfe=24.0, tokens_per_forward=1.0, avg_query_tokens=work, full_recompute_rate=0.0,
                                 tokens_per_s=1.0, answer_tokens_per_s=1.0, decision_share=0.0)


def test_missing_embedded_model_is_a_clear_error(monkeypatch, tmp_path):
    import dengine.assets as assets

    monkeypatch.setitem(assets.EMBEDDED_MODELS, assets.DEFAULT_MODEL, tmp_path / "absent")
    with pytest.raises(ValueError, match=f"embedded model '{assets.DEFAULT_MODEL}' is not part of this build"):
        assets.resolve_model(None)
    assert assets.resolve_model(tmp_path) == tmp_path


def test_policy_table_covers_every_model_sampler_and_batch_size(tiny_models, tmp_path, capsys):
    from dengine.bench import policies

    out = tmp_path / "table"
    rows = policies.main(["--models", str(tiny_models / "llada"), str(tiny_models / "dream"), "--policies", "none",
                          'entropy:{"tau": 1e9, "k": 2}', "--samplers", "one-token", "threshold:0.9",
                          "--batch-sizes", "1", "3", "--n", "3", "--dtype", "float32", "--out", str(out), "--plot",
                          "--no-tqdm"])
    assert len(rows) == 2 * 2 * 2 * 2
    record = json.loads(out.with_suffix(".json").read_text())
    assert [(r["batch_size"], r["policy"]) for r in record["rows"][:4]] == [(1, "none"), (1, "entropy"),
                                                                            (3, "none"), (3, "entropy")]
    for row in record["rows"]:
        assert row["n"] == 3 and row["speedup"] > 0
        if row["policy"] == "none":
            assert row["full_recompute_rate"] == 1.0 and row["speedup"] == 1.0
        else:
            assert row["full_recompute_rate"] < 0.5  # step 0 of each request only
        if row["sampler"] == "one-token":
            assert row["tokens_per_forward"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| model | sampler |" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="sampler 'two-token'"):
        policies.sampler_params("two-token", 128, 32)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_one_token_sampler_commits_one_token_every_step(tiny_models, family):
    """Dream's own schedule at steps == gen_length commits none on a block's first step and two on its last
    (two tokens decided together); the benches' one-token sampler commits exactly one a step on both
    families, and on LLaDA exactly what LLaDA's schedule commits."""
    from dengine import LLM
    from dengine.bench import policies

    llm = LLM(str(tiny_models / family), dtype="float32")
    prompt = {"prompt_token_ids": [5, 9, 17, 33, 12]}
    one = policies.sampler_params("one-token", 64, 32).replace(stop_at_eos=False, trace=True)
    out = llm.generate(prompt, one, use_tqdm=False)[0]
    assert [len(step.commits) for step in out.trace.steps] == [1] * 64
    schedule = llm.generate(prompt, one.replace(tokens_per_step=None), use_tqdm=False)[0]
    commits = [len(step.commits) for step in schedule.trace.steps]
    if family == "llada":
        assert commits == [1] * 64 and schedule.token_ids == out.token_ids
    else:
        assert commits[0] == 0 and commits[31] == 2 and sum(commits) == 64


def test_throughput_benchmark_reports_the_real_run(tiny_models, tmp_path):
    from dengine.bench import throughput

    out = tmp_path / "tp"
    record = throughput.main(["--model", str(tiny_models / "dream"), "--policies", "none", "dual", "--concurrency",
                              "1", "3", "--prompt-source", "random", "--input-len", "20", "--gen-length", "64",
                              "--dtype", "float32", "--out", str(out), "--plot", "--no-tqdm"])
    results = record["results"]
    assert [(r["policy"], r["max_num_seqs"], r["requests"]) for r in results] == [
        ("none", 1, 1), ("none", 1, 1), ("none", 3, 3), ("none", 1, 3), ("dual", 1, 1), ("dual", 1, 1),
        ("dual", 3, 3), ("dual", 1, 3)]
    for r in results:
        assert r["nfe"] == 64 and r["tokens_per_forward"] == 1.0 and 0 < r["peak_kv_usage"] <= 1
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["model_tflops"] > 0
    none_batched, none_single = results[2], results[3]
    assert none_batched["engine_steps"] == 64 and none_single["engine_steps"] == 3 * 64
    assert none_batched["query_tokens_per_forward"] == 20 + 64  # a full canvas every step
    assert results[6]["query_tokens_per_forward"] < 20 + 64
    assert "batched / one at a time" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    assert record["peak_tflops"] > 0


def test_a_noisy_machine_is_reported(monkeypatch, tmp_path, capsys):
    from dengine.bench import report

    peaks = iter([1e12, 0.5e12, 1e12, 1.05e12])  # a run that lost half its speed, then a quiet one
    monkeypatch.setattr(report, "measured_peak_flops", lambda **_: next(peaks))
    monkeypatch.setattr(report.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    noisy = report.run_record("bench", ["--x", "a b"], report.QuietCheck())
    assert noisy["command"] == "bench --x 'a b'"  # pastes into a shell
    warnings = noisy["quiet"]["warnings"]
    assert len(warnings) == 2 and "load average was 9.0" in warnings[0] and "-50%" in warnings[1]
    assert "WARNING: the load average" in capsys.readouterr().err
    report.write_report(tmp_path / "noisy", noisy, "table")
    assert (tmp_path / "noisy.md").read_text().count("**Warning:**") == 2
    monkeypatch.setattr(report.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert report.run_record("bench", [], report.QuietCheck())["quiet"]["warnings"] == []


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_random_real_format_checkpoint_loads_and_runs(family, tmp_path):
    """The width benchmark's writer: the real tensor names (those of the real index, for the layers kept), the
    real config apart from the layer count and the overrides, weights that load and a step that runs."""
    from dengine.bench import width
    from dengine.models.loader import load_model

    narrow = {"llada": {"d_model": 64, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 96},
              "dream": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "intermediate_size": 96}}[family]
    folder = width.write_random_checkpoint(tmp_path / family, family, num_layers=2, overrides=narrow)
    real = {"llada": "llada-8b-instruct", "dream": "dream-v0-instruct-7b"}[family]
    real_names = json.loads((Path(__file__).parent / "data" / "hf" / real / "model.safetensors.index.json")
                            .read_text())["weight_map"]
    kept = {n for n in real_names if not any(f".{i}." in n for i in range(2, 40))}
    written = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(written) == kept
    config = json.loads((folder / "config.json").read_text())
    assert config == {**width.REAL_CONFIGS[family], width.LAYERS[family]: 2, **narrow}
    model = load_model(folder, dtype="bfloat16")
    assert model.config.vocab_size == width.REAL_CONFIGS[family]["vocab_size"]
    (times,) = width.step_times([folder], canvas=40, rows=[1, 8, 40], block=4, repeats=1)
    assert sorted(times) == [1, 8, 40] and all(t > 0 for t in times.values())


def test_width_interpolation_is_linear_between_measured_rows():
    from dengine.bench.width import interpolate

    times = {1: 1.0, 8: 2.0, 40: 6.0}
    assert interpolate(times, 8) == 2.0 and interpolate(times, 24) == 4.0 and interpolate(times, 48) == 7.0


def test_headline_prices_every_run_against_vanilla(tiny_models, tmp_path, capsys):
    from dengine.bench import headline

    width = {"command": "dengine bench width", "canvas": 170, "commit": "abc", "date": "2026-12-05",
             "predicted_full_model": {"1": 0.5, "32": 1.5, "256": 8.5}}
    (tmp_path / "width.json").write_text(json.dumps(width))
    rows = headline.main(["--model", str(tiny_models / "llada"), "--n", "3", "--policies", "entropy", "dual",
                          "--batch-size", "2", "--wall-n", "1", "--width-record", str(tmp_path / "width.json"),
                          "--dtype", "float32", "--no-tqdm", "--out", str(tmp_path / "h"), "--plot"])
    assert [(r.label, r.sampler) for r in rows] == [("vanilla", "one-token"), ("none", "threshold:0.9"),
                                                    ("entropy", "threshold:0.9"), ("dual", "threshold:0.9")]
    vanilla = rows[0].result
    assert vanilla.nfe == 128 and vanilla.full_recompute_rate == 1.0  # one token per step, every step full
    for row in rows:
        r = row.result
        assert row.cost == pytest.approx(r.nfe * r.avg_query_tokens)
        assert row.cost_speedup == pytest.approx(vanilla.nfe * vanilla.avg_query_tokens / row.cost)
        rows_per_forward = r.avg_query_tokens  # priced by hand: linear between 32 and 256 rows, or 1 and 32
        low, high = (1, 32) if rows_per_forward <= 32 else (32, 256)
        step = width["predicted_full_model"][str(low)] + (
            width["predicted_full_model"][str(high)] - width["predicted_full_model"][str(low)]) * (
            rows_per_forward - low) / (high - low)
        assert row.predicted_s == pytest.approx(r.nfe * step)
        assert row.predicted_speedup == pytest.approx(rows[0].predicted_s / row.predicted_s)
        assert row.batch1_speedup is not None and row.batch1_speedup > 0
    assert rows[0].cost_speedup == 1.0 and rows[3].cost_speedup > 1.0  # dual computes fewer rows per forward
    assert "cost-side speedup" in capsys.readouterr().out
    assert (tmp_path / "h.png").stat().st_size > 0 and json.loads((tmp_path / "h.json").read_text())["rows"]


def test_gpu_check_runs_every_stage_small_on_cpu(tmp_path):
    """The one-call GPU check, in its CPU mode: every stage runs and passes, and the record says so."""
    from dengine.bench import gpu_check

    record = gpu_check.main(["--device", "cpu", "--small", "--no-tqdm", "--out", str(tmp_path / "check")])
    assert record["passed"], gpu_check.markdown(record)
    stages = record["stages"]
    assert set(stages) == {"environment", "tests", "backends", "accuracy", "throughput"}
    assert "passed" in stages["tests"]["summary"] and stages["tests"]["returncode"] == 0
    assert stages["backends"]["worst_relative_error"] == {"llada/torch": 0.0, "dream/torch": 0.0}
    assert {(r["model"], r["policy"]) for r in stages["accuracy"]["rows"]} == {
        (m, p) for m in ("llada-sudoku", "dream-sudoku") for p in ("none", "entropy")}
    rows = stages["throughput"]["rows"]
    assert {(r["policy"], r["concurrency"]) for r in rows} == {(p, c) for p in ("none", "entropy", "dual") for c in (1, 2)}
    assert all(0 < r["mfu"] < 1 for r in rows)
    dual = [r for r in rows if r["policy"] == "dual"]
    assert all(r["query_tokens_per_forward"] < 96 for r in dual), "dual computes fewer rows than a full step"
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["passed"] and "| throughput | yes |" in (tmp_path / "check.md").read_text()
