"""The fused Gumbel-max sampling kernel: exact on greedy rows, the right distribution on random rows,
and a row's token a function of its seed alone (not of the batch around it).

On a machine without CUDA the kernel runs in Triton's interpreter, on small vocabularies; on a GPU
(`-m gpu`) the same checks run at real vocabulary sizes.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before any @triton.jit runs

import importlib  # noqa: E402
import sys  # noqa: E402

if "kernels.triton_sampling" in sys.modules:  # imported earlier without the interpreter: re-decorate
    importlib.reload(sys.modules["kernels.triton_sampling"])

from kernels.triton_sampling import gumbel_argmax  # noqa: E402
from kernels.triton_testing import patch_interpreter_scalar_index  # noqa: E402

patch_interpreter_scalar_index()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter runs one Python call per program (row): keep the statistical checks small there.
DRAWS = 20000 if DEVICE == "cuda" else 400
# Six tokens whose least likely one still gets about 8 of 400 draws at T=0.6; 5 degrees of freedom.
BASE_LOGITS = torch.linspace(-1.0, 1.0, 6)
CHI2_999 = 20.52  # the 99.9% quantile of chi-square with 5 degrees of freedom


def _chi2(temperature_drawn: float, temperature_expected: float) -> float:
    logits = BASE_LOGITS.unsqueeze(0).expand(DRAWS, -1).contiguous()
    tokens = gumbel_argmax(logits.to(DEVICE), *_inputs(DRAWS, range(DRAWS), temperature=temperature_drawn))
    observed = torch.bincount(tokens.cpu(), minlength=len(BASE_LOGITS)).double()
    expected = torch.softmax(BASE_LOGITS.double() / temperature_expected, dim=0) * DRAWS
    return ((observed - expected) ** 2 / expected).sum().item()


def _inputs(batch, seeds, temperature=1.0, random=True):
    return (
        torch.full((batch,), 1.0 / temperature, dtype=torch.float32, device=DEVICE),
        torch.as_tensor(seeds, dtype=torch.int64, device=DEVICE),
        torch.full((batch,), random, dtype=torch.bool, device=DEVICE),
    )


@pytest.mark.parametrize("vocab", [1, 7, 2048, 2049, 5000])
def test_greedy_rows_match_torch_argmax_including_ties(vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=generator).to(DEVICE)
    logits[0] = 0.0  # all tied: the first index wins, as torch.argmax does
    if vocab > 3:
        logits[1, [1, vocab - 1]] = 50.0  # a tie across blocks
    inv_t, seeds, is_random = _inputs(6, range(6), random=False)
    tokens = gumbel_argmax(logits, inv_t, seeds, is_random)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()


def test_masked_tokens_are_never_drawn():
    vocab = 40
    logits = torch.full((120, vocab), float("-inf"))
    logits[:, [3, 17, 39]] = torch.tensor([0.0, 1.0, -1.0])
    inv_t, seeds, is_random = _inputs(120, range(1000, 1120))
    tokens = gumbel_argmax(logits.to(DEVICE), inv_t, seeds, is_random)
    assert set(tokens.tolist()) <= {3, 17, 39}
    assert len(set(tokens.tolist())) == 3


def test_a_rows_token_depends_on_its_seed_alone():
    vocab = 300
    generator = torch.Generator().manual_seed(0)
    row = torch.randn(vocab, generator=generator)
    alone = gumbel_argmax(row.unsqueeze(0).to(DEVICE), *_inputs(1, [12345]))
    others = torch.randn(9, vocab, generator=generator)
    batch = torch.cat([others[:4], row.unsqueeze(0), others[4:]]).to(DEVICE)
    seeds = [7, 8, 9, 10, 12345, 11, 12, 13, 14, 15]
    in_batch = gumbel_argmax(batch, *_inputs(10, seeds))
    assert in_batch[4].item() == alone.item()
    again = gumbel_argmax(batch, *_inputs(10, seeds))
    assert again.tolist() == in_batch.tolist()


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    """Chi-square goodness of fit against softmax(logits / T), one row per draw, distinct seeds."""
    chi2 = _chi2(temperature, temperature)
    assert chi2 < CHI2_999, f"chi2={chi2:.1f}"


def test_a_wrong_temperature_is_detected_by_the_same_check():
    """The chi-square check above can fail: draws at T=1.7 do not pass as T=0.6."""
    assert _chi2(1.7, 0.6) > CHI2_999


def test_rows_with_a_stride_and_half_precision():
    vocab = 100
    padded = torch.randn(5, vocab + 28).to(DEVICE).half()
    view = padded[:, :vocab]
    tokens = gumbel_argmax(view, *_inputs(5, range(5), random=False))
    assert tokens.tolist() == view.float().argmax(dim=-1).tolist()


@pytest.mark.gpu
def test_full_vocabulary_on_gpu():
    vocab, batch = 151936, 256
    logits = torch.randn(batch, vocab, device="cuda")
    tokens = gumbel_argmax(logits, *_inputs(batch, range(batch), random=False))
    assert torch.equal(tokens, logits.argmax(dim=-1))
    sampled = gumbel_argmax(logits, *_inputs(batch, range(batch), temperature=0.6))
    assert ((sampled >= 0) & (sampled < vocab)).all()
