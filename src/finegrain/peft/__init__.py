"""Parameter-efficient fine-tuning: adapters injected into a built model by replacing its linear layers.

`base` is method-neutral (the METHODS table, inject, named adapters, PEFT's files); each method is
one file (`lora`).
"""

from finegrain.peft.base import (
    DEFAULT_ADAPTER,
    METHODS,
    adapted_layers,
    adapter_layers,
    adapter_state_dict,
    apply_lora,
    inference_form,
    inject,
    load_adapter,
    load_tensors,
    lr_scales,
    merge_adapters,
    method_config,
    method_options,
    read_adapter,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unload_adapters,
    unmerge_adapters,
)
from finegrain.peft.adapter import BottleneckConfig, BottleneckLinear
from finegrain.peft.bitfit import BitfitConfig
from finegrain.peft.dora import DoraConfig, DoraLinear
from finegrain.peft.full import FullConfig
from finegrain.peft.head import HeadOnlyConfig
from finegrain.peft.ia3 import Ia3Config, Ia3Linear
from finegrain.peft.adalora import AdaLoraConfig, AdaLoraLinear
from finegrain.peft.lora import LoraConfig, LoraLinear, lora_layers
from finegrain.peft.prefix import PrefixConfig, PrefixEncoder
from finegrain.peft.prompt import PromptConfig, PromptEncoder

__all__ = [
    "DEFAULT_ADAPTER",
    "METHODS",
    "AdaLoraConfig",
    "AdaLoraLinear",
    "BitfitConfig",
    "BottleneckConfig",
    "BottleneckLinear",
    "DoraConfig",
    "DoraLinear",
    "FullConfig",
    "HeadOnlyConfig",
    "Ia3Config",
    "Ia3Linear",
    "LoraConfig",
    "LoraLinear",
    "PrefixConfig",
    "PrefixEncoder",
    "PromptConfig",
    "PromptEncoder",
    "adapted_layers",
    "adapter_layers",
    "adapter_state_dict",
    "apply_lora",
    "inference_form",
    "inject",
    "load_adapter",
    "load_tensors",
    "lr_scales",
    "lora_layers",
    "merge_adapters",
    "method_config",
    "method_options",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload_adapters",
    "unmerge_adapters",
]
