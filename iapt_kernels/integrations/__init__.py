"""Wiring of IAPT into Hugging Face ``transformers`` causal LMs: prompt slots, per-layer hooks,
multi-tenant generation, save/load, a Trainer data collator (docs/design.md sections 1 and 4).

``transformers`` is not imported here: the hooks are plain PyTorch, so any causal LM whose decoder
layers form an ``nn.ModuleList`` works; ``safetensors`` is imported by save/load only.
"""

from .collator import IAPTDataCollator
from .io import load_iapt, read_iapt_config, save_iapt
from .slots import insert_prompt_slots, slot_positions
from .transformers import IAPTConfig, IAPTModel, apply_iapt, find_decoder_layers

__all__ = [
    "IAPTConfig",
    "IAPTModel",
    "apply_iapt",
    "find_decoder_layers",
    "insert_prompt_slots",
    "slot_positions",
    "save_iapt",
    "load_iapt",
    "read_iapt_config",
    "IAPTDataCollator",
]
