"""scripts/setup.sh's promise: serving on a CPU needs no triton, and a bad flag is refused with its usage."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Make `import triton` fail, then serve one request on the CPU demo model end to end (engine + sampler).
_NO_TRITON = """
import sys
sys.modules["triton"] = None  # any import of triton now raises ImportError
from worker import LLM, SamplingParams
out = LLM("demo", device="cpu").generate(["hello"], SamplingParams(temperature=0.8, max_tokens=3, seed=1),
                                          use_tqdm=False)
assert len(out[0].outputs[0].token_ids) == 3
import worker.server.app, router.app  # the HTTP frontend and the router import without it too
print("served without triton")
"""


def test_cpu_serving_never_imports_triton():
    result = subprocess.run([sys.executable, "-c", _NO_TRITON], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "served without triton" in result.stdout


def test_setup_refuses_an_unknown_flag_with_its_usage():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--gpu"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "usage: bash scripts/setup.sh [--test]" in result.stderr
