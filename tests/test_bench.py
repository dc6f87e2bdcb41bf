"""The benchmarks run (in seconds, on tiny settings) and write the files the README quotes.
They are measurements, not timed tests: nothing here asserts a speed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.quality import CEILING, SWEEP, earlier_rates

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_writes_both_result_files(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"image", "S", "peak_mb", "step_s"} <= set(results["memory"][0])
    assert all(row["peak_mb"] > 0 for row in results["memory"] if row["status"] == "ok")  # a step takes memory
    assert {"cached_speedup", "cascade_s_per_image"} <= set(results["sampling"])
    # every sampler draws the reference's images but where a uniform falls at a float tie of the CDF
    assert all(cascade["images_agree"] for cascade in results["sampling"]["cascades"])
    assert {"minutes", "cascade_bpd", "single_transformer_bpd", "pixelcnnpp_bpd", "codecs"} <= set(results["quality"])
    assert set(results["quality"]["sweep"]) == {"cascade", "single_transformer", "pixelcnnpp"}  # the same sweep for each
    assert all(len(sweep["val_bpd"]) == len(SWEEP) for sweep in results["quality"]["sweep"].values())
    # the steps each stage trained in its minutes, read from its checkpoint, beside the steps planned
    training = results["quality"]["cascade"]["training"].values()
    assert all(0 < row["steps"] <= CEILING * row["planned_steps"] for row in training)
    assert results["sampling"]["decoder"]["agree"]
    assert results["codec"]["identical"]
    assert "## Quality at equal compute" in (tmp_path / "results.md").read_text()
    assert "## The cascade as a codec" in (tmp_path / "results.md").read_text()

    # a longer point alone, at the rates an earlier run's sweep chose (here: rates that no sweep tries)
    results["quality"]["lr"] = {"cascade": 1.25e-3, "single_transformer": 2.5e-3, "pixelcnnpp": 5e-4}
    (tmp_path / "earlier.json").write_text(json.dumps(results))
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--parts", "quality", "--lr-from",
                           str(tmp_path / "earlier.json"), "--out", str(tmp_path / "again")], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())["quality"]
    assert again["lr"] == results["quality"]["lr"] and again["sweep"] == results["quality"]["sweep"]
    assert again["lr_from"]["file"] == str(tmp_path / "earlier.json")
    assert "not swept again here" in (tmp_path / "again" / "results.md").read_text()
    assert "Steps trained in 0.1 minutes: cascade" in (tmp_path / "again" / "results.md").read_text()


def test_gpu_script_runs_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(tmp_path / "gpu.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert any(row["stage"] == "cascade sampling" for row in rows)


def test_bench_runs_the_parts_named_and_refuses_others(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--parts", "throughput", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "throughput" in results and not {"memory", "sampling", "quality", "codec", "gpu"} & set(results)
    assert results["command"] == "python -m benchmarks.run --parts throughput --smoke"
    report = (tmp_path / "results.md").read_text()
    assert "## Training throughput" in report and "## Sampling" not in report
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--parts", "quality,speed", "--out",
                           str(tmp_path / "other")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: --parts 'quality,speed': unknown speed; name some of "
        "memory, sampling, throughput, experiment64, quality, gpu"]
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("module, arguments, names", [
    ("run", ["--minutes", "abc"], "--minutes"),
    ("run", ["--parts", "quality", "--lr-from", "missing.json"], "missing.json"),
    ("run", ["--lr-from", "bench/quality/results.json", "--parts", "memory"], "--lr-from"),
    ("ablate", ["--stage", "depth"], "--stage"),
    ("ablate", ["--init", "missing.ckpt"], "--init"), ("ablate", ["--init", "bench"], "bench: a folder"),
    ("revisions", [], "revisions"),
    ("ablate", ["--model", "{width: 64}"], "not JSON"), ("ablate", ["--model", "[64]"], "JSON object"),
    ("ablate", ["--model", '{"widht": 64}'], "widht"), ("ablate", ["--model", '{"width": "abc"}'], "model.width"),
    ("ablate", ["--model", '{"ordinal_init": "maybe"}'], "model.ordinal_init"),
    ("ablate", ["--model", '{"bits": 4}'], "bits"), ("ablate", ["--model", '{"width": 30}'], "30"),
    ("ablate", ["--lr", "-1"], "--lr -1.0")])
def test_a_benchmark_usage_mistake_is_one_line(module, arguments, names):
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert f"python -m benchmarks.{module} --help" in lines[0] and names in lines[0]


def test_an_earlier_runs_rates_are_used_only_when_each_model_has_a_positive_one(tmp_path):
    rates = {"cascade": 1e-3, "single_transformer": 2e-3, "pixelcnnpp": 5e-4}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine": "not a dict", "quality": {"experiment": "smoke", "lr": rates, "sweep": {}}}))
    assert earlier_rates(path, "smoke")["lr"] == rates and earlier_rates(path, "smoke")["from"]["machine"] is None
    for lr in (None, -1e-3, 0, "abc", True):
        path.write_text(json.dumps({"quality": {"experiment": "smoke", "lr": {**rates, "pixelcnnpp": lr}, "sweep": {}}}))
        with pytest.raises(ValueError, match="pixelcnnpp is not a positive number"):
            earlier_rates(path, "smoke")
