"""Models shipped with fxpar for demos, tests and benchmarks (random init, no downloads). Every
model's ``forward(*inputs)`` returns its training loss and ``example_inputs(batch)`` gives random
inputs of the right shapes."""

from fxpar.models.alexnet import AlexNet
from fxpar.models.gpt import GPT, GPTConfig
from fxpar.models.layers import ModelConfigError
from fxpar.models.llama import Llama, LlamaConfig
from fxpar.models.mlp import MLP
from fxpar.models.resnet import ResNet18, ResNet50
from fxpar.models.vgg import VGG16

__all__ = ["MLP", "AlexNet", "ModelConfigError", "GPT", "GPTConfig", "Llama", "LlamaConfig", "ResNet18", "ResNet50", "VGG16"]
