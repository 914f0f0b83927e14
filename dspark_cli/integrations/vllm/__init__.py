"""DSpark on vLLM 0.32.0's Model Runner V1: the code our patch series (patches/vllm/v0.32.0) calls.

Only `proposer` imports vLLM; `settings` and `verify` import it lazily, so this package loads
without vLLM installed."""
