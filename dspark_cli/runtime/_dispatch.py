"""Route a call to our CUDA op when the extension is loaded and the inputs live on CUDA. An op may
return NotImplemented to decline a case it does not cover (the torch reference then runs)."""

from dspark_cli.runtime import cuda_ops


def try_cuda(name: str, tensors, *args, **kwargs):
    op = getattr(cuda_ops, name, None)
    if op is None or not cuda_ops.available(*tensors):
        return NotImplemented
    return op(*args, **kwargs)
