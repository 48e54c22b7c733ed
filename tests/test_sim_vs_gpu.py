"""bench/reports/fleet_sim_vs_gpu_compare.py: the sim-vs-GPU table the integrator reads after a new profile."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fleet_sim_vs_gpu_compare",
                                              ROOT / "bench" / "reports" / "fleet_sim_vs_gpu_compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_reads_the_gpu_figures_from_the_committed_report():
    rows = compare.gpu_rows(compare.GPU_REPORT)
    assert rows["cache_aware"] == {"req_s": 42.34, "hit_rate": 0.937}
    assert rows["round_robin"] == {"req_s": 15.47, "hit_rate": 0.53}


def test_table_gives_ratios_and_the_15_percent_verdict(tmp_path, capsys):
    sim = {"setup": "4 sim workers", "settings": {"worker_arg": ["--sim-profile", "h200-llama3-8b"]},
           "rows": [{"router": "cache_aware", "req_s": 47.83, "hit_rate": 0.937, "failed": 0},
                    {"router": "round_robin", "req_s": 16.0, "hit_rate": 0.50, "failed": 0},
                    {"router": "least_load", "req_s": 30.0, "hit_rate": 0.6, "failed": 0}]}
    sim_path, out = tmp_path / "fleet.json", tmp_path / "cmp.md"
    sim_path.write_text(json.dumps(sim))
    assert compare.main([str(sim_path), str(out), "--label", "old profile"]) == 0
    text = out.read_text()
    assert "old profile" in text and "linear-v1" in text  # the profile's form is named
    assert "| cache_aware | 42.34 | 47.83 | 1.13 | yes | 93.7% | 93.7% | 1.00 | yes |" in text
    assert "| round_robin | 15.47 | 16.00 | 1.03 | yes | 53.0% | 50.0% | 0.94 | yes |" in text
    assert "least_load" not in text  # no GPU figure to compare with
    assert "All within 15%: yes" in text
    sim["rows"][0]["req_s"] = 28.0
    sim_path.write_text(json.dumps(sim))
    assert compare.main([str(sim_path), str(out)]) == 0
    assert "| 0.66 | **no** |" in out.read_text() and "All within 15%: no" in out.read_text()


def test_a_sim_run_without_gpu_routers_is_a_clear_error(tmp_path, capsys):
    sim_path = tmp_path / "fleet.json"
    sim_path.write_text(json.dumps({"setup": "", "rows": [{"router": "least_load", "req_s": 1, "hit_rate": 0.5,
                                                           "failed": 0}]}))
    assert compare.main([str(sim_path), str(tmp_path / "x.md")]) == 2
    assert "no router" in capsys.readouterr().err
