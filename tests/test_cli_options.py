"""Command-line conventions (parse level): `up` passes worker options through, vLLM / SGLang aliases,
"did you mean", unsupported flags, CPU thread shares, defaults in --help."""

from __future__ import annotations

import argparse

import pytest

from router.launcher import add_arguments as add_up_arguments
from router.launcher import cpu_threads_per_worker, plan_workers, try_line, worker_pass_through
from worker.cli import build_parser, main
from worker.server.cli import (
    DEMO_DEFAULT_MAX_TOKENS,
    UsageError,
    add_arguments as add_worker_arguments,
    engine_config_from_args,
    resolve_cpu_threads,
    resolve_default_max_tokens,
    take_positional_model,
)


def _parse(add, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def _worker_args(argv: list[str]) -> argparse.Namespace:
    args = _parse(add_worker_arguments, argv)
    take_positional_model(args, "demo")
    return args


def test_up_passes_worker_options_to_every_worker():
    args = _parse(add_up_arguments, ["--model", "/models/qwen", "--max-model-len", "8192", "--served-model-name",
                                     "qwen", "--kv-cache-tokens", "4096", "--dtype", "float16", "--policy",
                                     "round_robin", "--scheduling-policy", "lpm", "--no-enable-prefix-caching"])
    assert args.policy == "round_robin"  # under up, --policy is the router's
    specs = plan_workers(2, "cpu", [], args.model, 8100, extra_args=worker_pass_through(args))
    worker_argv = specs[1].argv[specs[1].argv.index("worker") + 1:]
    # What each worker receives parses back to the settings given to `up`.
    parsed = _worker_args(worker_argv)
    config = engine_config_from_args(parsed)
    assert (config.model, config.max_model_len, config.kv_cache_tokens, config.dtype) == \
        ("/models/qwen", 8192, 4096, "float16")
    assert config.policy == "lpm" and config.enable_prefix_cache is False
    assert parsed.served_model_name == ["qwen"] and parsed.port == 8101


def test_up_with_no_worker_options_passes_only_the_planned_ones():
    args = _parse(add_up_arguments, [])
    assert worker_pass_through(args) == ["--shutdown-timeout", "30.0", "--log-level", "info"]


def test_up_takes_a_positional_model():
    args = _parse(add_up_arguments, ["/models/llama"])
    take_positional_model(args, "demo")
    assert args.model == "/models/llama"


def test_cpu_workers_share_the_cores_and_an_explicit_count_wins():
    assert cpu_threads_per_worker(2, 2) == 1
    assert cpu_threads_per_worker(2, 16) == 8
    assert cpu_threads_per_worker(4, 2) == 1  # never zero
    specs = plan_workers(2, "cpu", [], "demo", 8100, cpu_threads=3)
    assert all(s.argv[s.argv.index("--cpu-threads") + 1] == "3" for s in specs)
    gpu_specs = plan_workers(None, "auto", ["0"], "demo", 8100)
    assert "--cpu-threads" not in gpu_specs[0].argv


def test_cpu_threads_auto_follows_omp_num_threads_else_every_core():
    assert resolve_cpu_threads("auto", {"OMP_NUM_THREADS": "3"}) == 3
    assert resolve_cpu_threads("auto", {}) >= 1
    assert resolve_cpu_threads("4", {"OMP_NUM_THREADS": "3"}) == 4
    with pytest.raises(UsageError, match="--cpu-threads"):
        resolve_cpu_threads("zero", {})


def test_cpu_threads_auto_is_one_on_the_sim_executor_unless_set():
    assert resolve_cpu_threads("auto", {}, executor="sim") == 1
    assert resolve_cpu_threads("auto", {"OMP_NUM_THREADS": "3"}, executor="sim") == 3
    assert resolve_cpu_threads("2", {}, executor="sim") == 2
    assert resolve_cpu_threads("auto", {}, executor="cpu") == resolve_cpu_threads("auto", {})


@pytest.mark.parametrize("argv, field, value", [
    (["--gpu-memory-utilization", "0.5"], "mem_fraction", 0.5),
    (["--mem-fraction-static", "0.6"], "mem_fraction", 0.6),
    (["--max-num-seqs", "8"], "max_running_requests", 8),
    (["--no-enable-prefix-caching"], "enable_prefix_cache", False),
    (["--enable-prefix-caching"], "enable_prefix_cache", True),
    (["--model-path", "/models/m"], "model", "/models/m"),
    (["/models/m"], "model", "/models/m"),
    (["--scheduling-policy", "priority"], "policy", "priority"),
])
def test_vllm_and_sglang_spellings_mean_ours(argv, field, value):
    assert getattr(engine_config_from_args(_worker_args(argv)), field) == value


def test_two_different_models_are_refused():
    with pytest.raises(UsageError, match="two models"):
        _worker_args(["/models/a", "--model", "/models/b"])


def test_tokenizer_and_chat_template_are_accepted():
    args = _worker_args(["--tokenizer", "/tok", "--chat-template", "{{ messages }}"])
    assert args.tokenizer == "/tok" and args.chat_template == "{{ messages }}"


def test_default_max_tokens_is_small_on_the_demo_model_only():
    assert resolve_default_max_tokens("auto", "demo") == DEMO_DEFAULT_MAX_TOKENS
    assert resolve_default_max_tokens("auto", "/models/qwen") is None
    assert resolve_default_max_tokens("none", "demo") is None
    assert resolve_default_max_tokens("7", "demo") == 7


def test_an_unknown_flag_gets_the_subcommands_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--max-num-seq", "3"])  # a prefix is not silently taken for --max-num-seqs
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: radixfleet worker")
    assert err.strip().splitlines()[-1] == "radixfleet worker: error: unrecognized argument --max-num-seq; " \
                                           "did you mean --max-num-seqs?"


def test_did_you_mean_under_up(capsys):
    with pytest.raises(SystemExit):
        main(["up", "--worker-base-prot", "9000"])
    err = capsys.readouterr().err
    assert err.startswith("usage: radixfleet up")
    assert "did you mean --worker-base-port?" in err


def test_tensor_parallelism_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["worker", "--model", "demo", "--tensor-parallel-size", "2"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("radixfleet worker: error: --tensor-parallel-size: tensor parallelism is not supported")
    assert "one per GPU" in last


@pytest.mark.parametrize("command, expected", [
    ("up", ["(default: 8000)", "(default: 8100)", "(default: 0.0.0.0)", "(default: cache_aware)"]),
    ("worker", ["(default: 127.0.0.1)", "(default: 8000)", "(default: 65536)"]),
    ("generate", ["(default: 0.0)", "every choice of --n is then the same text"]),
])
def test_help_shows_defaults(command, expected):
    _, sub = build_parser([command, "--help"])
    text = " ".join(sub.format_help().split())  # undo the line wrapping
    for piece in expected:
        assert piece in text, piece


def test_try_line_sets_max_tokens_and_sends_the_key():
    line = try_line("http://localhost:8000/v1", "demo", "$RADIXFLEET_API_KEY")
    assert '"max_tokens": 32' in line
    assert '-H "Authorization: Bearer $RADIXFLEET_API_KEY"' in line
    assert "Authorization" not in try_line("http://localhost:8000/v1", "demo", None)
