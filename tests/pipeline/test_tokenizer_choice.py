"""--tokenizer openai|folder: our OpenAI-cleaned BPE or the folder's transformers CLIPTokenizer, both offered."""

from __future__ import annotations

import numpy as np
import pytest

from unclip_jax.input.tokenizer import ClipTokenizer, FolderTokenizer
from unclip_jax.pipeline.loading import PipelineLoadError, load_tokenizer

# Text that OpenAI's cleaning (ftfy.fix_text, html.unescape) rewrites: curly quotes, full-width letters, a
# ligature, an HTML entity.
PROMPTS = ["a red circle", "“a cat” ＡＢＣ ﬁne &amp; dandy", "Ｈｅｌｌｏ &amp;amp; ‘world’"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    ClipTokenizer(pad_token="<|endoftext|>").save_hf_files(root / "tokenizer")
    return root


def test_both_kinds_load_from_a_model_folder(folder):
    openai = load_tokenizer(folder, None, "openai")
    hf = load_tokenizer(folder, None, "folder")
    assert isinstance(openai, ClipTokenizer) and isinstance(hf, FolderTokenizer)
    assert openai.pad_token_id == hf.pad_token_id == 49407  # the folder's pad token, both ways
    ids_o, mask_o = openai(PROMPTS)
    ids_f, mask_f = hf(PROMPTS)
    assert ids_o.shape == ids_f.shape == (3, 77) and ids_f.dtype == np.int32 and mask_f.dtype == bool
    np.testing.assert_array_equal(ids_o[0], ids_f[0])  # plain captions agree
    from transformers import CLIPTokenizer

    want = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))(PROMPTS, padding="max_length", max_length=77)
    np.testing.assert_array_equal(ids_f, np.asarray(want["input_ids"]))  # "folder" is transformers' exactly
    np.testing.assert_array_equal(mask_f, np.asarray(want["attention_mask"], bool))
    assert [(ids_o[i] != ids_f[i]).any() for i in (1, 2)] == [True, True]  # and the cleaning makes a difference


def test_folder_kind_needs_tokenizer_files(tmp_path):
    with pytest.raises(PipelineLoadError, match="no tokenizer/tokenizer_config.json"):
        load_tokenizer(tmp_path, None, "folder")
    with pytest.raises(PipelineLoadError, match="expected one of"):
        load_tokenizer(tmp_path, None, "sentencepiece")


def test_folder_tokenizer_truncates_like_ours(folder, caplog):
    long = " ".join(["word"] * 100)
    ids, mask = load_tokenizer(folder, None, "folder")([long])
    assert mask.all() and ids[0, -1] == 49407
    assert "last 25 tokens were dropped" in caplog.text
