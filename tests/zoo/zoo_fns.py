"""Third-party models (Hugging Face ``transformers``) built from tiny configs with random weights,
no network, and the rank function that trains them on real gloo ranks (importable, as spawn
needs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

import fxpar
from tools.hf_models import LossOf

GLOBAL_BATCH = 8
SEQ = 16
VOCAB = 128
NUM_STEPS = 3
# Adam divides each gradient by its running RMS, so a gradient near zero whose last bits differ
# (a sharded sum adds in another order than one process) moves its weight by up to the full step:
# a step of 1e-4 keeps that inside the tolerance, while a wrong gradient still moves weights by
# a multiple of it.
LR = 1e-4


def _text() -> dict:
    return {"vocab_size": VOCAB, "max_position_embeddings": SEQ}


def _gpt2(dropout: float) -> nn.Module:
    import transformers as T

    # GPT-2's default config drops out at 0.1 in three places; dropout=None keeps those defaults.
    extra = {} if dropout is None else {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    config = T.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
                          bos_token_id=0, eos_token_id=0, **extra)
    return LossOf(T.GPT2LMHeadModel(config), "input_ids")


def _llama(dropout: float) -> nn.Module:
    import transformers as T

    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, bos_token_id=0, eos_token_id=0, **_text())
    return LossOf(T.LlamaForCausalLM(config), "input_ids")


def _bert(dropout: float) -> nn.Module:
    import transformers as T

    extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    config = T.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          pad_token_id=0, **_text(), **extra)
    return LossOf(T.BertForMaskedLM(config), "input_ids")


def _t5(dropout: float) -> nn.Module:
    import transformers as T

    extra = {} if dropout is None else {"dropout_rate": dropout}
    config = T.T5Config(vocab_size=VOCAB, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **extra)
    return LossOf(T.T5ForConditionalGeneration(config), "input_ids")


def _vit(dropout: float) -> nn.Module:
    import transformers as T

    extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    config = T.ViTConfig(image_size=16, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_labels=10, **extra)
    return LossOf(T.ViTForImageClassification(config), "pixel_values")


def _resnet(dropout: float) -> nn.Module:
    import transformers as T

    config = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    return LossOf(T.ResNetForImageClassification(config), "pixel_values")


MODELS: dict[str, Callable[[float | None], nn.Module]] = {
    "gpt2": _gpt2, "llama": _llama, "bert": _bert, "t5": _t5, "vit": _vit, "resnet": _resnet,
}
_IMAGES = {"vit": (3, 16, 16), "resnet": (3, 32, 32)}


def make_model(name: str, *, dropout: float | None = 0.0) -> nn.Module:
    """The model called ``name`` (seeded); ``dropout=None`` keeps the config's default dropout."""
    torch.manual_seed(0)
    return MODELS[name](dropout)


def batch(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: the same on every process, different per step."""
    g = torch.Generator().manual_seed(1000 + step)
    if name in _IMAGES:
        return torch.randn(GLOBAL_BATCH, *_IMAGES[name], generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return ids, torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def reference_training(name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = make_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(NUM_STEPS):
        loss = model(*batch(name, step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_all(rank: int, jobs: dict[str, tuple[str, str]]) -> dict[str, tuple[list[float], dict[str, torch.Tensor]]]:
    """Train each model of ``jobs`` (name -> (plan JSON, codegen)) for NUM_STEPS AdamW steps."""
    out = {}
    for name, (text, codegen) in jobs.items():
        model = make_model(name)
        compiled = fxpar.compile(model, batch(name, 0), plan=fxpar.Plan.from_json(text), codegen=codegen)
        assert compiled.codegen == codegen, compiled.codegen
        k = compiled.num_ranks
        opt = torch.optim.AdamW(compiled.parameters(), lr=LR)
        losses = []
        for step in range(NUM_STEPS):
            loss = compiled(*(x.chunk(k)[rank] for x in batch(name, step)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        out[name] = (losses, compiled.state_dict())
        dist.barrier()
    return out
