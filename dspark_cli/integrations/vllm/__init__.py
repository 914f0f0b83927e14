"""DSpark in vLLM: the code our patch series call. Model Runner V1 (patches/vllm/v0.29.0 to
v0.33.0): `proposer` and the modules it uses; Model Runner V2's `sample_sequential` hook
(patches/vllm/v0.33.0): `v2_fused`.

Only `proposer` imports vLLM at import time; `e2e` imports it when run, and `verify` runs `e2e` in
a subprocess, so this package loads without vLLM installed."""
