"""maxllm: a JAX-native stack for building large language models end to end."""

__version__ = "0.1.0"
