"""The toy transformer of the planning-speed benchmark: pre-norm blocks of fxpar's GPT (d=1024,
16 heads, MLP 4096, no biases, no dropout) on a sequence of 256 activations, trained to a target
with the mean squared error.

    from tools.toy_transformer import ToyTransformer
    model = ToyTransformer(num_blocks=2)
    x, y = model.example_inputs(64)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxpar.models import GPTConfig
from fxpar.models.gpt import Block


class ToyTransformer(nn.Module):
    def __init__(self, num_blocks: int = 2, d_model: int = 1024, n_head: int = 16, seq_len: int = 256):
        super().__init__()
        self.cfg = GPTConfig(vocab_size=1, seq_len=seq_len, n_layer=num_blocks, n_head=n_head, d_model=d_model,
                             dropout=0.0, bias=False)
        self.blocks = nn.ModuleList(Block(self.cfg) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return F.mse_loss(x, target)

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations and targets ``[batch, seq_len, d_model]``, on the parameters' device."""
        device = self.blocks[0].fc.weight.device
        shape = (batch, self.cfg.seq_len, self.cfg.d_model)
        return torch.randn(shape, device=device), torch.randn(shape, device=device)
