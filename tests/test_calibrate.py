"""`radixfleet bench calibrate` end to end on the CPU executor: the profile it writes stores its raw samples
(every grid family, doc-QA documents and questions included), loads in the sim executor, and refits
offline to the same model, or to the older form."""

import argparse
import json

import pytest

from bench import calibrate
from worker.executor.sim import SimProfile


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrate")
    out = folder / "cpu-demo.json"
    # chunks of 128 tokens, so the quick grid's 200-token documents are prefilled in two chunks
    args = parse("--model", "demo", "--device", "cpu", "--quick", "--max-num-batched-tokens", "128",
                 "--kv-cache-tokens", "16384", "--out", str(out))
    assert calibrate.run(args) == 0
    return out


def test_cpu_calibration_stores_samples_of_every_family(cpu_profile):
    data = json.loads(cpu_profile.read_text())
    assert data["cost_model"]["form"] == "eager-v2"
    families = {s["f"] for s in data["samples"]}
    assert {"decode", "prefill", "admit", "document", "question"} <= families
    assert len(data["samples"]) == data["fit"]["num_samples"] + data["fit"]["outliers_dropped"]
    documents = [s for s in data["samples"] if s["f"] == "document"]
    assert any(s["d"][0] > 0 for s in documents), "documents are prefilled beside running decodes"
    assert {tuple(c) for s in documents for c in s["p"]} >= {(0, 128)}, "a document's first 128-token chunk"
    questions = [s for s in data["samples"] if s["f"] == "question"]
    assert max(len(s["p"]) for s in questions) == 3, "3 questions per step in the quick grid"
    assert all(prefix >= 128 for s in questions for prefix, _ in s["p"]), "questions land on a cached document"
    profile = SimProfile.load(str(cpu_profile))
    assert profile.cost_model.form == "eager-v2"


def test_refit_reproduces_the_fit_and_can_fit_the_older_form(cpu_profile, tmp_path):
    original = json.loads(cpu_profile.read_text())
    same = tmp_path / "same.json"
    assert calibrate.run(parse("--refit", str(cpu_profile), "--out", str(same))) == 0
    refitted = json.loads(same.read_text())
    assert refitted["cost_model"]["coefficients_s"] == pytest.approx(original["cost_model"]["coefficients_s"])
    assert refitted["samples"] == original["samples"]
    assert refitted["measured"]["refit"]["from"] == str(cpu_profile)

    old = tmp_path / "old.json"
    assert calibrate.run(parse("--refit", str(cpu_profile), "--out", str(old), "--form", "linear-v1")) == 0
    assert SimProfile.load(str(old)).cost_model.form == "linear-v1"


def test_refit_and_missing_arguments_name_the_fix(tmp_path, capsys):
    no_samples = tmp_path / "old.json"
    no_samples.write_text(json.dumps({"name": "old", "cost_model": {"form": "linear-v1", "coefficients_s": {}}}))
    assert calibrate.run(parse("--refit", str(no_samples))) == 2
    assert "no raw 'samples'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"samples": [{"d": [1], "p": [], "s": 0.1}]}))
    assert calibrate.run(parse("--refit", str(bad))) == 2
    assert "a sample needs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--refit", str(no_samples), "--form", "cubic")
    assert calibrate.run(parse("--device", "cpu")) == 2
    assert "--model M --out PATH" in capsys.readouterr().err
