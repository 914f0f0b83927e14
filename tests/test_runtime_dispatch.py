"""When the runtime hands a call to our CUDA ops: only with the extension loaded, every input on
CUDA, and a case the op covers (else the torch reference runs). CPU-only checks."""

import torch

from dspark_cli.runtime import _dispatch, cuda_ops


def test_try_cuda_declines_cpu_tensors_with_the_extension_loaded(monkeypatch):
    called = []
    monkeypatch.setattr(cuda_ops, "load", lambda: "libdspark.so")
    monkeypatch.setattr(cuda_ops, "markov_chain", lambda *a, **k: called.append(1))
    with cuda_ops.enabled(True):
        assert _dispatch.try_cuda("markov_chain", [torch.zeros(1)], 1) is NotImplemented
    assert not called


def test_the_cuda_chain_declines_w1_and_w2_of_different_dtypes_before_the_extension():
    gamma, V = 3, 16
    U = torch.zeros(1, gamma, V, dtype=torch.bfloat16)
    w1, w2 = torch.zeros(V, 4, dtype=torch.bfloat16), torch.zeros(V, 4, dtype=torch.float16)
    out = cuda_ops.markov_chain(U, torch.zeros(1, dtype=torch.int64), w1, w2, torch.ones(1),
                                seeds=torch.zeros(1, dtype=torch.int64))
    assert out is NotImplemented
