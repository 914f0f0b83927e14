"""Our softmax_rows op (csrc/softmax_rows.cu: a verification's target probabilities and greedy
tokens from an engine's logits) on a GPU against torch.softmax and torch.argmax: both paths (few
rows: two kernels over split rows, vector and scalar loads; from 33 rows on Hopper: one pass, a
cluster per row), ties, rows of −inf only, NaN and +inf entries, the engine's spare rows left
alone, and CUDA-graph capture. Skipped, with the reason, without a GPU or a build.

    PYTHONPATH=. python -m pytest -q tests/test_softmax_rows_gpu.py     (after `dspark build`)"""

import pytest
import torch

from dspark_cli.runtime import cuda_ops
from dspark_cli.runtime.target_probs import softmax_rows

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_extension")]


def ours_and_torch(logits: torch.Tensor, spare: int = 1):
    """(probs, best) from our op into buffers with `spare` rows after N (NaN / −7 there), and torch's."""
    N, V = logits.shape
    probs = torch.full((N + spare, V), float("nan"), device="cuda")
    best = torch.full((N + spare,), -7, dtype=torch.int64, device="cuda")
    with cuda_ops.enabled(True):
        softmax_rows(logits, probs, best)
    assert torch.isnan(probs[N:]).all() and (best[N:] == -7).all(), "a spare row was written"
    return probs[:N], best[:N], torch.softmax(logits, dim=-1), torch.argmax(logits, dim=-1)


def test_a_larger_vocabulary_after_a_smaller_one():
    """The one-pass kernel's shared-memory limit is set once per process: a later, larger V (a
    second model) must still launch. First in this file, so the smaller V sets it."""
    for V in (32000, 151936):
        logits = torch.randn(64, V, device="cuda")
        probs, best, ref_probs, ref_best = ours_and_torch(logits)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-12)
        assert torch.equal(best, ref_best)


@pytest.mark.parametrize("N,V", [(7, 151936), (896, 151936), (130, 50257), (3, 37), (1, 4099), (64, 32000),
                                 (40, 128256), (33, 4)])
def test_matches_torch_softmax_and_argmax(N, V):
    """N = 7: one request's γ rows, split across blocks; 896 (R = 128), 64, 40 and 33: a cluster per
    row on Hopper; odd V: scalar loads, two kernels whatever N."""
    g = torch.Generator(device="cuda").manual_seed(N * 7 + V)
    logits = torch.randn(N, V, device="cuda", generator=g).mul_(4)
    probs, best, ref_probs, ref_best = ours_and_torch(logits)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-12)
    assert torch.equal(best, ref_best)
    torch.testing.assert_close(probs.sum(-1), torch.ones(N, device="cuda"), rtol=1e-5, atol=0)


@pytest.mark.parametrize("extra_rows", [0, 60])
def test_ties_take_the_first_maximum_across_splits(extra_rows):
    """Equal maxima in different slices of one row (and in one thread's group of 4): the lowest id,
    torch.argmax's answer, whatever slice finishes first; extra all-zero rows take the cluster path."""
    V = 151936
    logits = torch.zeros(4 + extra_rows, V, device="cuda")
    logits[0, [5, 90000, 151935]] = 3.0
    logits[1, [151934, 151935]] = 2.0
    logits[2, [4097, 4096]] = 1.0
    probs, best, ref_probs, ref_best = ours_and_torch(logits)  # row 3: all equal
    assert best.tolist() == ref_best.tolist() == [5, 151934, 4096] + [0] * (1 + extra_rows)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("extra_rows", [0, 60])
def test_rows_without_a_distribution_are_nan_as_in_torch(extra_rows):
    """A row of −inf only, a NaN entry, one and two +inf entries, a finite row masked to one entry:
    the probabilities NaN where torch's are, its values elsewhere; the argmax torch's (NaN first).
    With 60 more rows, the cluster path."""
    V = 50000
    logits = torch.randn(6 + extra_rows, V, device="cuda")
    logits[0] = float("-inf")
    logits[1, 123] = float("nan")
    logits[2, 777] = float("inf")
    logits[3, [10, 40000]] = float("inf")
    logits[4] = float("-inf")
    logits[4, 31337] = 0.5
    probs, best, ref_probs, ref_best = ours_and_torch(logits)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-12, equal_nan=True)
    assert torch.equal(best, ref_best) and best[1] == 123 and best[4] == 31337
    assert probs[4, 31337] == 1.0


@pytest.mark.parametrize("N", [21, 200])
def test_without_best_and_under_cuda_graph_capture(N):
    """best=None writes only the probabilities; captured once, a replay recomputes from new logits."""
    V = 151936
    logits = torch.randn(N, V, device="cuda")
    probs = torch.empty(N + 1, V, device="cuda")
    best = torch.empty(N + 1, dtype=torch.int64, device="cuda")
    with cuda_ops.enabled(True):
        softmax_rows(logits, probs)
        torch.cuda.synchronize()
        torch.testing.assert_close(probs[:N], torch.softmax(logits, -1), rtol=1e-5, atol=1e-12)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            softmax_rows(logits, probs, best)
    logits.copy_(torch.randn(N, V, device="cuda").mul_(2))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(probs[:N], torch.softmax(logits, -1), rtol=1e-5, atol=1e-12)
    assert torch.equal(best[:N], logits.argmax(-1))
