"""Serving: a JAX decode engine with continuous batching (`engine.py`), sampling
on device (`sampling.py`), weight-only int8 (`quantize.py`) and an OpenAI- and
TGI-compatible HTTP server (`server.py`); `python -m maxllm.serve --model PATH`."""
