"""Wiring of IAPT into Hugging Face ``transformers`` causal LMs: prompt slots, per-layer hooks,
multi-tenant generation, save/load, a Trainer data collator (docs/design.md sections 1 and 9).

``transformers`` is not imported here: the hooks are plain PyTorch, so any causal LM whose decoder
layers form an ``nn.ModuleList`` works; ``safetensors`` is imported by save/load only. The modules
import one way, ``slots`` < ``config`` < ``hooks`` < ``io`` < ``collator`` < ``model`` < ``vllm``
(docs/design.md section 9, "Module layout").
"""

from .collator import IAPTDataCollator
from .config import IAPTConfig
from .hooks import find_decoder_layers
from .io import read_iapt_config
from .model import IAPTModel, apply_iapt, load_iapt, save_iapt
from .slots import insert_prompt_slots, slot_positions

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
