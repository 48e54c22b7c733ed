"""`radixfleet bench vs-vllm`: how engines and their variants are named, and the served mode end to end
on a CPU demo worker (vLLM itself only runs on the GPU machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.vs_vllm import REPO_ROOT, flags_as_options, parse_engines
from worker.models.checkpoint_writer import write_checkpoint


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint("demo", tmp_path_factory.mktemp("demo") / "demo", progress=False)


def test_engine_list_with_variants():
    specs = parse_engines("vllm, radixfleet[--max-num-batched-tokens 8192],radixfleet")
    assert [(label, engine) for label, engine, _tree, _flags in specs] == [
        ("vllm", "vllm"), ("radixfleet[--max-num-batched-tokens 8192]", "radixfleet"), ("radixfleet", "radixfleet")]
    assert specs[1][3] == ["--max-num-batched-tokens", "8192"]
    assert all(tree == REPO_ROOT for _label, _engine, tree, _flags in specs)


def test_unknown_engine_and_missing_tree_are_named(tmp_path):
    with pytest.raises(SystemExit, match="unknown engine 'sglang'"):
        parse_engines("vllm,sglang")
    with pytest.raises(SystemExit, match="no radixfleet source tree"):
        parse_engines(f"radixfleet@{tmp_path}")


def test_variant_flags_become_engine_keywords():
    assert flags_as_options(["--max-num-batched-tokens", "8192", "--no-enable-cuda-graphs", "--dtype", "bfloat16",
                             "--mem-fraction", "0.5"]) == {
        "max_num_batched_tokens": 8192, "enable_cuda_graphs": False, "dtype": "bfloat16", "mem_fraction": 0.5}
    with pytest.raises(SystemExit, match="expected a --flag"):
        flags_as_options(["8192"])


@pytest.mark.slow
def test_served_mode_on_a_cpu_worker(tmp_path, demo_checkpoint):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "bench", "vs-vllm", "--model", str(demo_checkpoint), "--modes", "served",
         "--engines", "radixfleet", "--requests", "6", "--concurrency", "2", "--documents", "2",
         "--doc-chars", "400", "--max-tokens", "4", "--max-num-seqs", "8", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / f"vs_vllm_served_{Path(demo_checkpoint).name}.json").read_text())
    (row,) = report["rows"]
    assert row["engine"] == "radixfleet" and row["requests"] == 6 and row["failed"] == 0
    assert row["output_tok_s"] > 0 and 0 < row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert "bench vs-vllm" in report["command"]


def test_every_pass_is_the_same_work_with_fresh_token_ids():
    import argparse

    from bench.vs_vllm import _workload

    args = argparse.Namespace(token_id_max=10000, seed=0, min_len=100, max_len=1024, num_seqs=8, repeats=2,
                              sampling="t0.6,greedy")
    runs = _workload(args, 32000)["runs"]
    assert len(runs) == 4
    assert all([len(p) for p in run["prompts"]] == [len(p) for p in runs[0]["prompts"]] for run in runs)
    assert all(run["output_lens"] == runs[0]["output_lens"] for run in runs)
    assert runs[0]["prompts"][0][:16] != runs[1]["prompts"][0][:16]  # nothing to reuse from the pass before
