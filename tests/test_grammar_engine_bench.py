"""bench/grammar_engine_bench.py on the CPU demo model: it runs, every row of the grammar mode is really
constrained, and the JSON carries what a reader needs to repeat it. Also the engine case the benchmark
first tripped over: a row that goes on past its completed grammar (ignore_eos)."""

from __future__ import annotations

import json

from worker import LLM, SamplingParams
from worker.sampling_params import StructuredOutput


def test_cpu_smoke_run_writes_both_modes_per_batch(tmp_path, capsys):
    from bench import grammar_engine_bench

    out = tmp_path / "bench.json"
    argv = ["--model", "demo", "--device", "cpu", "--batch", "1", "3", "--steps", "3", "--warmup", "1",
            "--repeats", "2", "--out", str(out)]
    assert grammar_engine_bench.main(argv) == 0
    report = json.loads(out.read_text())
    setting = report["setting"]
    assert setting["command"] == "python -m bench.grammar_engine_bench " + " ".join(argv)
    assert setting["machine"] and setting["device"] == "cpu" and setting["steps"] == 3
    assert [r["batch"] for r in report["results"]] == [1, 3]
    for row in report["results"]:
        for mode in ("none", "json_schema"):
            result = row[mode]
            assert result["tokens"] == row["batch"] * 3  # one token per row per timed step
            assert result["ms_per_step"] > 0 and result["ms_per_step"] in result["ms_per_step_runs"]
            assert len(result["ms_per_step_runs"]) == 2
        forced = '{"title": "'  # what the schema allows first, whatever the model prefers
        for mode, constrained in (("json_schema", True), ("none", False)):
            text = row[mode]["sample_text"]
            assert (forced.startswith(text) or text.startswith(forced)) == constrained, (mode, text)
        assert row["overhead_ms"] == row["json_schema"]["ms_per_step"] - row["none"]["ms_per_step"]
    table = capsys.readouterr().out
    assert "ms/step grammar" in table and "overhead %" in table


def test_ignore_eos_past_a_completed_grammar_keeps_ending(tmp_path):
    llm = LLM("demo", device="cpu", progress=False)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                            structured_output=StructuredOutput("choice", json.dumps(["yes", "no"])))
    choice = llm.generate(["Answer:"], params, use_tqdm=False)[0].outputs[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 12
    assert choice.text in ("yes", "no")  # after the grammar's end only eos tokens (skipped in the text) follow
    eos = set(llm.engine.eos_token_ids)
    first_eos = next(i for i, t in enumerate(choice.token_ids) if t in eos)
    assert all(t in eos for t in choice.token_ids[first_eos:])
