"""Parameter-efficient fine-tuning: adapters injected into a built model by replacing its linear layers."""

from finegrain.peft.base import (
    METHODS,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    read_adapter,
    save_adapter,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)
from finegrain.peft.lora import LoraConfig, LoraLinear

__all__ = [
    "METHODS",
    "LoraConfig",
    "LoraLinear",
    "apply_lora",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "read_adapter",
    "save_adapter",
    "trainable_parameters",
    "unload_lora",
    "unmerge_lora",
]
