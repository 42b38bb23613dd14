"""Small models and a synthetic task for tests, demos and benchmarks: no download, no data files.

* :class:`SyntheticTask`: the largest or the smallest digit of a digit string, as the instruction says
  (the task of ``python -m iapt_kernels.train``'s built-in demo).
* :func:`tiny_llama`: a tiny randomly initialised ``LlamaForCausalLM`` sized for that task.
* :func:`save_tiny_model`: a tiny random Llama and a byte-level tokenizer saved as a local model
  directory, for code that takes a model path (``python -m iapt_kernels.train --model DIR``).

The models need ``transformers`` (the ``hf`` extra; ``save_tiny_model`` also ``tokenizers``, which
``transformers`` installs); the task needs nothing beyond the standard library.
"""

from __future__ import annotations

import os
import random

import torch

__all__ = ["HELD_OUT_SEED", "SyntheticTask", "tiny_llama", "save_tiny_model"]

HELD_OUT_SEED = (
    10_000  # the held-out examples' RNG seed: never a training seed (train.py uses seed * 1000 + rank)
)


class SyntheticTask:
    """The largest or the smallest digit of a digit string, as the instruction says.

    Instruction ``<s> max 3 9 4`` -> response ``9 </s>``; ``<s> min 3 9 4`` -> ``3 </s>``. The answer
    depends on the instruction's op and digits, so the soft prompts must depend on the instruction:
    what IAPT's generators are for. Ids: 0 pad, 1 bos, 2 eos, 3 slot, 4 ``max``, 5 ``min``,
    6..15 the digits ``0``-``9`` (no tokenizer needed).
    """

    PAD, BOS, EOS, SLOT, MAX, MIN, DIGIT0 = 0, 1, 2, 3, 4, 5, 6
    vocab_size = 16

    def __init__(self, min_len: int = 3, max_len: int = 6) -> None:
        self.min_len, self.max_len = min_len, max_len

    def sample(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """One ``(instruction_ids, response_ids)`` pair."""
        n = rng.randint(self.min_len, self.max_len)
        digits = [rng.randrange(10) for _ in range(n)]
        op = rng.choice((self.MAX, self.MIN))
        answer = max(digits) if op == self.MAX else min(digits)
        return [self.BOS, op] + [self.DIGIT0 + d for d in digits], [self.DIGIT0 + answer, self.EOS]

    def held_out(self, n: int) -> list[tuple[list[int], list[int]]]:
        """``n`` examples drawn with :data:`HELD_OUT_SEED`, which no training run uses."""
        rng = random.Random(HELD_OUT_SEED)
        return [self.sample(rng) for _ in range(n)]

    def decode(self, ids) -> str:
        """The ids as words (``<s> max 3 9 4``), padding dropped."""
        names = {
            self.PAD: "",
            self.BOS: "<s>",
            self.EOS: "</s>",
            self.SLOT: "_",
            self.MAX: "max",
            self.MIN: "min",
        }
        return " ".join(names.get(int(i), str(int(i) - self.DIGIT0)) for i in ids if int(i) != self.PAD)

    def to_dict(self) -> dict:
        """The task's settings as JSON-able data (saved as ``demo.json`` by the training demo)."""
        return {"task": "max_min_digit", "min_len": self.min_len, "max_len": self.max_len}


def tiny_llama(vocab_size: int, seed: int = 0, initializer_range: float = 0.2, **config):
    """A tiny randomly initialised ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, the synthetic
    task's special tokens); ``config`` overrides any ``LlamaConfig`` field (the serving benchmark and the
    tests build their models here too).

    Weights are drawn with std ``initializer_range`` = 0.2, not Hugging Face's 0.02: with 0.02 the frozen
    output head of a random model gives near-uniform logits whatever the soft prompts do, so the loss
    could hardly fall even when every answer is right.
    """
    import transformers

    torch.manual_seed(seed)
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        bos_token_id=SyntheticTask.BOS,
        eos_token_id=SyntheticTask.EOS,
        pad_token_id=SyntheticTask.PAD,
        initializer_range=initializer_range,
    )
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **config}))


def save_tiny_model(path: str | os.PathLike) -> str | os.PathLike:
    """Save a tiny random Llama (seed 0, hidden 64, 2 layers) and a byte-level BPE tokenizer with no
    merges (one token per byte; ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2) into ``path``, laid out like a
    downloaded hub model so ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(path)`` load it.
    Returns ``path``."""
    import tokenizers
    import transformers

    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=160,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path
