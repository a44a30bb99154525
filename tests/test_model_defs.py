"""The shipped models are the standard architectures (parameter counts as published), build on
the meta device for planning, give inputs their forward accepts, and reject bad configurations."""

from __future__ import annotations

import pytest
import torch

from fxpar.models import GPT, VGG16, AlexNet, GPTConfig, Llama, LlamaConfig, ModelConfigError, ResNet18, ResNet50
from fxpar.models.layers import Dropout

# Published parameter counts of the reference definitions (torchvision's AlexNet, VGG-16,
# ResNet-18/50 with 1000 classes; GPT-2 small with tied embeddings; Llama-7B).
PUBLISHED = [
    (AlexNet, 61_100_840),
    (VGG16, 138_357_544),
    (ResNet18, 11_689_512),
    (ResNet50, 25_557_032),
    (GPT, 124_439_808),
    (Llama, 6_738_415_616),
]


@pytest.mark.parametrize("cls, count", PUBLISHED, ids=[c.__name__ for c, _ in PUBLISHED])
def test_default_sizes_match_the_published_parameter_counts(cls, count):
    with torch.device("meta"):
        model = cls()
    assert sum(p.numel() for p in model.parameters()) == count


def test_full_size_models_capture_on_the_meta_device():
    from fxpar.planner import capture_and_annotate

    with torch.device("meta"):
        model = AlexNet(image_size=224)
    gm = capture_and_annotate(model, model.example_inputs(2))
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default]
    assert len(convs) == 5
    assert tuple(convs[0].meta["val"].shape) == (2, 64, 55, 55)  # the 11x11 stride-4 stem


SMALL = [
    lambda: AlexNet(num_classes=10, image_size=32),
    lambda: VGG16(num_classes=10, image_size=32, width=0.25),
    lambda: ResNet18(num_classes=10, image_size=32, width=0.25),
    lambda: ResNet50(num_classes=10, image_size=32, width=0.125),
    lambda: GPT(GPTConfig(vocab_size=50, seq_len=16, n_layer=2, n_head=2, d_model=16, dropout=0.1)),
    lambda: Llama(LlamaConfig(vocab_size=50, seq_len=16, n_layer=2, n_head=4, n_kv_head=2, d_model=16, ffn_hidden=24)),
]


@pytest.mark.parametrize("make", SMALL, ids=["alexnet", "vgg16", "resnet18", "resnet50", "gpt", "llama"])
def test_small_models_train_a_step_on_their_example_inputs(make):
    torch.manual_seed(0)
    model = make()
    loss = model(*model.example_inputs(4))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dropout_draws_masks_in_training_and_is_the_identity_otherwise():
    torch.manual_seed(0)
    x = torch.ones(1000)
    drop = Dropout(0.5)
    y = drop(x)
    assert set(y.unique().tolist()) == {0.0, 2.0} and 400 < int((y == 0).sum()) < 600
    drop.eval()
    assert torch.equal(drop(x), x)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Dropout(1.0), r"dropout probability is 1.0; it must be in \[0, 1\)"),
        (lambda: AlexNet(width=0), r"width is 0; .* must be positive"),
        (lambda: AlexNet(image_size=8), r"image_size >= 15; got 8"),
        (lambda: VGG16(image_size=16), r"image_size must be at least 32; got 16"),
        (lambda: GPTConfig(d_model=10, n_head=4), r"d_model \(10\) must be a multiple of n_head \(4\)"),
        (lambda: LlamaConfig(d_model=48, n_head=16), r"d_model \(48\) / n_head \(16\) must be an even integer"),
        (lambda: LlamaConfig(n_head=32, n_kv_head=5), r"n_head \(32\) must be a multiple of n_kv_head \(5\)"),
    ],
)
def test_bad_configurations_raise_model_config_errors(make, match):
    with pytest.raises(ModelConfigError, match=match):
        make()
