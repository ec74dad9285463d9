"""Baselines the load tests compare loraswap with: plain vLLM and a naive PEFT server."""
