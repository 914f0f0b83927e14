import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def vllm_sockets_directory():
    """Engines the tests start directly (not through run_in_python) put vLLM's never-unlinked IPC
    sockets where run_in_python puts them: a short directory removed after the session."""
    from dspark_cli.integrations.vllm.e2e import sockets_directory

    if "VLLM_RPC_BASE_PATH" in os.environ:
        yield
        return
    with sockets_directory() as sockets:
        os.environ["VLLM_RPC_BASE_PATH"] = sockets
        try:
            yield
        finally:
            del os.environ["VLLM_RPC_BASE_PATH"]


@pytest.fixture(scope="session")
def cuda_extension():
    """Our CUDA extension loaded (built first when there is no build); skips, with the reason,
    without a GPU or a build."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    from dspark_cli.build import build
    from dspark_cli.errors import DsparkError
    from dspark_cli.runtime import cuda_ops

    try:
        path = cuda_ops.load() or cuda_ops.load(build().path)
    except DsparkError as exc:
        pytest.skip(f"extension not built: {exc}")
    if path is None:
        pytest.skip(f"extension not loaded: {cuda_ops.load_error()}")
