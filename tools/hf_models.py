"""Full-size Hugging Face models for planning benchmarks, built on the ``meta`` device (no
weights, no download): GPT-2 small with its default config and a Llama-7B-sized
``LlamaForCausalLM``. Each factory returns the model (its ``forward(inputs, labels)`` returns the
model's output, whose ``loss`` fxpar plans) and the global batch."""

from __future__ import annotations

import torch
from torch import nn


class LossOf(nn.Module):
    """Calls a Hugging Face model with its labels (``inputs`` passed as ``input_name``); fxpar takes
    the ``loss`` of the output."""

    def __init__(self, model: nn.Module, input_name: str = "input_ids"):
        super().__init__()
        self.model = model
        self.input_name = input_name

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor):
        return self.model(**{self.input_name: inputs}, labels=labels)


def gpt2_small(batch: int = 8, num_layers: int = 12) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """``GPT2LMHeadModel(GPT2Config())``: 12 layers, d=768, 12 heads, sequence 1024, dropout 0.1."""
    import transformers as T

    config = T.GPT2Config(n_layer=num_layers)
    with torch.device("meta"):
        model = LossOf(T.GPT2LMHeadModel(config))
    ids = torch.zeros(batch, config.n_positions, dtype=torch.long)
    return model, (ids, ids)


def llama_7b(batch: int = 64, num_layers: int = 32) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A Llama-7B-sized ``LlamaForCausalLM``: 32 layers, d=4096, 32 heads, MLP 11008, vocabulary
    32000, sequence 2048."""
    import transformers as T

    config = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers, num_attention_heads=32,
                           num_key_value_heads=32, max_position_embeddings=2048, vocab_size=32000)
    with torch.device("meta"):
        model = LossOf(T.LlamaForCausalLM(config))
    ids = torch.zeros(batch, 2048, dtype=torch.long)
    return model, (ids, ids)
