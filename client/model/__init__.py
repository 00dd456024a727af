"""Model integration: a llama2.c-format Llama loader used for real KV caches and logits."""

from client.model.llama2c import Llama2c, LlamaConfig, default_model_path

__all__ = ["Llama2c", "LlamaConfig", "default_model_path"]
