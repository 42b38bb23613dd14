"""The Hugging Face path's remaining silent traps (issue 24), one section per point of the issue: a
slot count that differs between data and model, tenants without weights, the two data formats,
padding that slips through, the backbone's methods lent by the wrapper, misleading messages, and the
demo's output folder. Each test failed on the code before the fix."""

import ast
import json
import os
import shutil
import subprocess
import warnings

import pytest
import torch
from helpers import rel_err
from test_integration import HAS_MT, INSTR, RESP, L, tiny_model, wrap

import iapt_kernels as ik

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
needs_mt = pytest.mark.skipif(not HAS_MT, reason="MultiTenantPromptGenerator not available")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRE = [30, 31]  # a response prefix, as a pretrained model needs


def layout(num_tokens, responses=True, side="right", prefix=PRE):
    return ik.insert_prompt_slots(
        INSTR,
        RESP if responses else None,
        num_tokens=num_tokens,
        pad_token_id=0,
        slot_token_id=3,
        padding_side=side,
        response_prefix_ids=prefix,
    )


def word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")


# ----------------------------------------------------------------------------- 1. slot count
@pytest.mark.parametrize("n", [2, 8])
def test_a_batch_laid_out_for_another_slot_count_is_refused(n):
    w = wrap(tiny_model("llama"))
    train = layout(n)
    assert train["slot_mask"].sum(1).tolist() == [n] * 3  # the batch records its layout
    with pytest.raises(ValueError, match=f"laid out for {n} slot tokens per row .*num_tokens={L}"):
        w(**train)
    collated = ik.IAPTDataCollator(num_tokens=n, pad_token_id=0, response_prefix=PRE)(
        [{"instruction_ids": i, "response_ids": r} for i, r in zip(INSTR, RESP)]
    )
    with pytest.raises(ValueError, match=f"laid out for {n} slot tokens per row .*num_tokens={L}"):
        w(**collated)
    prompt = layout(n, responses=False, side="left")
    with pytest.raises(ValueError, match=f"laid out for {n} slot tokens per row .*num_tokens={L}"):
        w.generate(**prompt, max_new_tokens=2)
    # Without the record, the tokens after the instruction show it: fewer slots put the prefix
    # there, more slots leave the slot token after the model's L.
    want = "do not hold one slot token id" if n < L else f"more than {L} slot tokens"
    for b in (train, prompt):
        del b["slot_mask"]
    with pytest.raises(ValueError, match=want):
        w(**train)
    with pytest.raises(ValueError, match=want):
        w.generate(**prompt, max_new_tokens=2)
    right = layout(L)  # the model's own layout passes, with and without its record
    with torch.no_grad():
        with_record = w(**right).logits
        del right["slot_mask"]
        assert torch.equal(w(**right).logits, with_record)


# ----------------------------------------------------------------------------- 2. tenants and their weights
@needs_mt
def test_one_tenant_of_a_multi_tenant_adapter_loads_as_a_single_tenant_model(tmp_path):
    mt = wrap(tiny_model("llama"), seed=4, num_tenants=3)
    b = layout(L)
    with torch.no_grad():
        ref = mt(**b, tenant_ids=torch.tensor([1, 1, 1])).logits
    mt(**b, tenant_ids=torch.tensor([0, 1, 2]))  # a call with gradients: every tenant trains
    ik.save_iapt(mt, tmp_path / "mt")
    one = ik.load_iapt(tiny_model("llama"), tmp_path / "mt", tenant=1)  # as the docstring says
    assert one.iapt_config.num_tenants == 1
    with torch.no_grad():
        assert rel_err(one(**b).logits, ref) < 1e-6  # single- and multi-tenant kernels


@needs_mt
def test_tenants_without_weights_are_refused_once_others_are_loaded(tmp_path):
    b = layout(L)
    single = wrap(tiny_model("llama"), seed=3)
    ik.save_iapt(single, tmp_path / "one")
    mt = wrap(tiny_model("llama"), seed=4, num_tenants=3)
    ik.load_iapt(mt, tmp_path / "one", tenant=1)
    assert mt.tenant_weights == ("initial", "loaded", "initial")
    prompt = layout(L, responses=False, side="left")
    with pytest.raises(ValueError, match=r"tenants \[0\], which hold neither loaded nor trained"):
        mt.generate(**prompt, tenant_ids=torch.tensor([1, 0, -1]), max_new_tokens=2)
    with torch.no_grad(), pytest.raises(ValueError, match=r"tenants \[2\], which hold neither"):
        mt(**b, tenant_ids=torch.tensor([2, 1, 1]))
    mt.generate(**prompt, tenant_ids=torch.tensor([1, -1, 1]), max_new_tokens=2)  # loaded or none: fine
    # Training a tenant from scratch next to loaded ones is legitimate: a call with gradients records it.
    mt(**b, tenant_ids=torch.tensor([0, 0, 1])).loss.backward()
    assert mt.tenant_weights == ("trained", "loaded", "initial")
    mt.generate(**prompt, tenant_ids=torch.tensor([1, 0, -1]), max_new_tokens=2)
    # Saving says which tenants are empty, records them, and a reload keeps them empty.
    with pytest.warns(UserWarning, match=r"tenants \[2\] hold their initial random weights"):
        ik.save_iapt(mt, tmp_path / "mt")
    meta = json.loads((tmp_path / "mt" / "iapt_config.json").read_text())
    assert meta["untrained_tenants"] == [2]
    back = ik.load_iapt(tiny_model("llama"), tmp_path / "mt")
    assert back.tenant_weights == ("loaded", "loaded", "initial")
    with pytest.raises(ValueError, match="tenant 2 of this adapter was saved with its initial"):
        ik.load_iapt(tiny_model("llama"), tmp_path / "mt", tenant=2)
    # load_state_dict (a Trainer's resume, a state dict passed around) records the same
    other = wrap(tiny_model("llama"), seed=9, num_tenants=3)
    other.load_state_dict(mt.state_dict())
    assert other.tenant_weights == ("loaded", "loaded", "initial")


@needs_mt
def test_a_fresh_multi_tenant_model_warns_once_and_older_adapters_load_whole(tmp_path):
    mt = wrap(tiny_model("llama"), seed=4, num_tenants=2)
    prompt = layout(L, responses=False, side="left")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            mt.generate(**prompt, tenant_ids=torch.tensor([0, 1, -1]), max_new_tokens=2)
    said = [r for r in rec if "initial random weights" in str(r.message)]
    assert len(said) == 1 and said[0].category is RuntimeWarning
    # An adapter without the record (every adapter saved before it existed) holds every tenant.
    mt(**layout(L), tenant_ids=torch.tensor([0, 1, 1]))
    ik.save_iapt(mt, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "iapt_config.json").read_text())
    assert "untrained_tenants" not in meta
    assert ik.load_iapt(tiny_model("llama"), tmp_path / "a").tenant_weights == ("loaded", "loaded")


# ----------------------------------------------------------------------------- 3. one data format
def test_the_collator_takes_output_like_response_and_refuses_an_unknown_response_key(tmp_path):
    tok = word_tokenizer()
    collator = ik.IAPTDataCollator(num_tokens=2, tokenizer=tok, response_prefix=[4])
    response = collator([{"instruction": "a b", "response": "b"}])
    output = collator([{"instruction": "a b", "output": "b"}])
    assert "labels" in output and all(torch.equal(response[k], output[k]) for k in response)
    ids = collator([{"instruction_ids": [2, 3], "output_ids": [3, 1]}])
    assert torch.equal(ids["labels"], output["labels"])
    with pytest.raises(ValueError, match=r"keys \['answer', 'instruction'\] but no response key"):
        collator([{"instruction": "a b", "answer": "b"}])
    with pytest.raises(ValueError, match="both 'response' and 'output'"):
        collator([{"instruction": "a b", "response": "b", "output": "c"}])
    with pytest.raises(TypeError, match="a list of examples"):
        collator({"instruction": "a b", "output": "b"})
    prompts = collator([{"instruction": "a b"}, {"instruction": "c"}])  # generation prompts, as before
    assert "labels" not in prompts
    # the training script reads the same JSONL
    from iapt_kernels.train import _load_jsonl

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a b", "output": "b"}\n')
    assert _load_jsonl(data, tok, 64) == [([2, 3], [3, 1])]


# ----------------------------------------------------------------------------- 4. padding
def test_padded_token_id_lists_are_refused_and_eos_as_pad_is_not():
    with pytest.raises(ValueError, match=r"instruction_ids rows \[1\] end with pad_token_id=0"):
        ik.insert_prompt_slots([[5, 6, 7], [8, 9, 0]], num_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match=r"rows \[0\] start with pad_token_id=0"):
        ik.insert_prompt_slots([[0, 0, 5], [6, 7, 8]], num_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="look padded"):  # one row padded to a max_length
        ik.insert_prompt_slots([[5, 6, 0, 0]], num_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match=r"response_ids rows \[1\] end with pad_token_id=2"):
        ik.insert_prompt_slots(
            [[5], [6]], [[7, 8, 2], [9, 2, 2]], num_tokens=2, pad_token_id=2, response_prefix_ids=[]
        )
    # EOS doubling as the pad id ends every response once: not padding
    b = ik.insert_prompt_slots(
        [[5], [6]], [[7, 2], [8, 2]], num_tokens=2, pad_token_id=2, response_prefix_ids=[]
    )
    assert b["labels"][:, -2:].tolist() == [[7, 2], [8, 2]]


def test_generate_refuses_right_padded_prompts():
    w = wrap(tiny_model("llama"))
    right = layout(L, responses=False, side="right")
    with pytest.raises(ValueError, match=r'rows \[1, 2\] end in padding.*padding_side="left"'):
        w.generate(**right, max_new_tokens=2)


# ----------------------------------------------------------------------------- 5. the wrapper's methods
def test_push_to_hub_uploads_the_adapter_directory(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    uploaded = {}

    class FakeApi:  # the hub is unreachable here: record what would be uploaded
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, **kw):
            shutil.copytree(folder_path, tmp_path / "up")
            return "commit"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    for name in ("create_repo", "upload_folder"):  # the backbone's own path would call these
        monkeypatch.setattr(hub, name, lambda *a, **k: pytest.fail("the backbone was pushed"))
    w = wrap(tiny_model("llama"))
    assert w.push_to_hub("me/adapter") == "commit"
    assert uploaded["repo"] == "me/adapter"
    assert sorted(os.listdir(tmp_path / "up")) == ["adapter_model.safetensors", "iapt_config.json"]
    b = layout(L)
    back = ik.IAPTModel.from_pretrained(tiny_model("llama"), tmp_path / "up")
    with torch.no_grad():
        assert torch.equal(back(**b).logits, w(**b).logits)
    # a hub id downloads the adapter's files only
    monkeypatch.setattr(hub, "snapshot_download", lambda repo, allow_patterns, **k: str(tmp_path / "up"))
    assert isinstance(ik.IAPTModel.from_pretrained(tiny_model("llama"), "me/adapter"), ik.IAPTModel)
    with pytest.raises(TypeError, match="takes the backbone first"):
        w.from_pretrained(str(tmp_path / "up"))
    with pytest.raises(AttributeError, match="does not lend 'load_adapter'"):
        w.load_adapter(str(tmp_path / "up"))


def test_peft_style_helpers_and_disable_adapter_is_the_bare_backbone(capsys):
    w = wrap(tiny_model("llama"))
    assert w.get_base_model() is w.model
    w.print_trainable_parameters()
    n, total = w.num_trainable_parameters(), sum(p.numel() for p in w.parameters())
    assert f"trainable params: {n:,d} || all params: {total:,d}" in capsys.readouterr().out
    b = layout(L)
    bare = tiny_model("llama")  # the same weights, never hooked
    plain = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}
    with torch.no_grad():
        want = bare(**plain)
        with w.disable_adapter():
            got = w(**b)
        adapted = w(**b)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    assert not torch.equal(adapted.logits, want.logits)  # outside it the prompts are back
    prompt = layout(L, responses=False, side="left")
    kw = dict(max_new_tokens=3, do_sample=False)
    with w.disable_adapter():
        gen = w.generate(**prompt, **kw)
    assert torch.equal(gen, bare.generate(prompt["input_ids"], attention_mask=prompt["attention_mask"], **kw))


def test_a_single_tenant_model_records_its_weights_too(tmp_path):
    w = wrap(tiny_model("llama"))
    assert w.tenant_weights == ("initial",)
    w(**layout(L)).loss.backward()
    assert w.tenant_weights == ("trained",)
    w.save_pretrained(tmp_path / "a")
    assert ik.load_iapt(tiny_model("llama"), tmp_path / "a").tenant_weights == ("loaded",)


def test_a_wrapper_without_hooks_refuses_to_run():
    w = wrap(tiny_model("llama"))
    backbone = w.remove_hooks()
    b = layout(L)
    with pytest.raises(RuntimeError, match="hooks were removed"):
        w(**b)
    with pytest.raises(RuntimeError, match="hooks were removed"):
        w.generate(**layout(L, responses=False, side="left"), max_new_tokens=1)
    ik.apply_iapt(backbone, num_tokens=L, bottleneck_size=16)  # the backbone can be wrapped again


# ----------------------------------------------------------------------------- 6. messages
def test_messages_say_what_is_wrong():
    w = wrap(tiny_model("llama"))
    b = layout(L)
    with pytest.raises(ValueError, match=r"labels copy input_ids \(labels = input_ids\?\)"):
        w(**{**b, "labels": b["input_ids"].clone()})
    slots_labelled = b["labels"].clone()
    slots_labelled[b["slot_mask"]] = 3
    with pytest.raises(ValueError, match=f"labels are set .* on the {L} slot tokens"):
        w(**{**b, "labels": slots_labelled})
    with pytest.raises(TypeError, match="flat list of ints. For one example pass \\[ids\\]"):
        ik.insert_prompt_slots([5, 6, 7], num_tokens=2, pad_token_id=0)
    with pytest.raises(TypeError, match="response_ids must be a list of rows"):
        ik.insert_prompt_slots([[5, 6, 7]], [8, 9], num_tokens=2, pad_token_id=0)


def test_docstrings_with_backslashes_are_raw():
    """``"\\nAnswer:"`` in a plain docstring is a line break in help(); r-strings keep the escape."""
    bad = []
    for folder, _, files in os.walk(os.path.join(ROOT, "iapt_kernels")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                src = f.read()
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = node.body[0] if node.body else None
                    if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                        text = ast.get_source_segment(src, doc.value) or ""
                        if "\\" in text and text[:1] not in "rR":
                            bad.append(f"{os.path.relpath(path, ROOT)}:{doc.lineno}")
    assert not bad, bad
    assert '"\\nAnswer:"' in ik.IAPTDataCollator.__doc__


# ----------------------------------------------------------------------------- 7. the demo's output folder
def test_the_demo_output_folder_is_ignored_by_git():
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    r = subprocess.run(
        ["git", "check-ignore", "-q", "iapt-adapter/adapter_model.safetensors"], cwd=ROOT, timeout=60
    )
    assert r.returncode == 0, "iapt-adapter/ (python -m iapt_kernels.train's default --out) is not ignored"
