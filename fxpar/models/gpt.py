"""A GPT-2-style decoder (Radford et al. 2019): learned token and position embeddings, pre-norm
blocks with LayerNorm, causal self-attention through ``F.scaled_dot_product_attention``, a GELU
MLP, a final LayerNorm and an output layer tied to the token embedding.

The query, key and value projections are three linear layers; GPT-2 stores them as one fused
matrix, which computes the same but cannot be cut by heads without splitting across q, k and v.
The defaults are GPT-2 small (124M parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxpar.models.layers import Dropout, ModelConfigError


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    seq_len: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ModelConfigError(
                f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head}): each head gets d_model // n_head features"
            )


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        heads = [p(x).view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)]
        y = F.scaled_dot_product_attention(*heads, is_causal=True)
        return self.dropout(self.out_proj(y.transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.dropout(self.proj(F.gelu(self.fc(self.ln_2(x)))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.apply(self._init)
        # GPT-2 scales the residual projections by the depth.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.dropout(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        # The output layer reuses the token embedding (tied weights).
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random token ids ``[batch, seq_len]`` and next-token targets of the same shape."""
        device = self.wte.weight.device
        shape = (batch, self.cfg.seq_len)
        return torch.randint(0, self.cfg.vocab_size, shape, device=device), torch.randint(0, self.cfg.vocab_size, shape, device=device)
