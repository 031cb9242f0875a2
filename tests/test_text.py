"""mythos_rt.text: prompt encoding, UTF-8-safe incremental decoding, stop strings."""

import random

import pytest

from mythos_rt.text import (Detokenizer, StopMatcher, TextStream, decode_completion,
                            encode_prompts)
from mythos_rt.tokenizer import BYTE_BOS, BYTE_EOS, ByteTokenizer, TokenizerError, load_tokenizer
from tests.test_tokenizer import make_hf_tokenizer, random_text


def stream_pieces(tok, ids, context=()):
    detok = Detokenizer(tok, context)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


@pytest.fixture(params=["byte", "byte_bpe"])
def tok(request, tmp_path):
    if request.param == "byte":
        return ByteTokenizer()
    # Trained on ASCII and "€" only: other characters stay split over byte tokens.
    return load_tokenizer(make_hf_tokenizer(tmp_path, 275, alphabet="ab z.\n€"))


def test_encode_prompts_single_and_batch():
    tok = ByteTokenizer()
    assert encode_prompts(tok, "hé") == ([[104, 0xC3, 0xA9]], True)
    assert encode_prompts(tok, ["a", "bc"], add_bos=True) == (
        [[BYTE_BOS, 97], [BYTE_BOS, 98, 99]], False)
    assert encode_prompts(tok, ("x",)) == ([[120]], False)
    with pytest.raises(TokenizerError, match="no prompts given"):
        encode_prompts(tok, [])
    with pytest.raises(TokenizerError, match="prompt 1 is a list, not a str"):
        encode_prompts(tok, ["a", [1, 2]])
    with pytest.raises(TokenizerError, match="prompt 0 encodes to no tokens"):
        encode_prompts(tok, "")
    assert encode_prompts(tok, "", add_bos=True) == ([[BYTE_BOS]], True)


def test_pieces_are_complete_characters_and_join_to_the_text(tok):
    assert len(tok.encode("😀")) == 4 and len(tok.encode("é")) == 2  # split characters
    rng = random.Random(5)
    for n in (1, 2, 17, 63):
        text = random_text(rng, n)
        ids = tok.encode(text)
        pieces, tail = stream_pieces(tok, ids)
        assert "".join(pieces) + tail == text
        assert tail == ""  # valid text leaves nothing held at the end
        for piece in pieces:
            assert "\ufffd" not in piece
            piece.encode("utf-8")  # valid UTF-8 (no lone surrogates)


def test_a_split_character_is_held_back_until_complete():
    tok = ByteTokenizer()
    detok = Detokenizer(tok)
    assert detok.push(ord("a")) == "a"
    snake = "🐍".encode("utf-8")
    assert [detok.push(b) for b in snake] == ["", "", "", "🐍"]
    assert detok.push(0xE2) == "" and detok.push(0x82) == ""
    assert detok.flush() == "\ufffd"  # generation ended inside a character
    assert detok.push(ord("z")) == "z"


def test_invalid_bytes_are_released_as_replacement_characters():
    tok = ByteTokenizer()
    pieces, tail = stream_pieces(tok, [ord("a"), 0xFF, ord("b"), 0xC3, 0xA9])
    assert pieces == ["a", "", "\ufffdb", "", "é"] and tail == ""


def test_special_ids_decode_to_nothing():
    pieces, tail = stream_pieces(ByteTokenizer(), [BYTE_BOS, 104, BYTE_EOS, 105])
    assert "".join(pieces) + tail == "hi"


def test_completion_decodes_as_it_reads_after_the_prompt(tmp_path):
    """A SentencePiece-style tokenizer drops a word's leading space at the start of a text."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    words = ["alpha", "beta", "gamma", "delta", "mu", "nu", "xi"]
    rng = random.Random(2)
    corpus = [" ".join(rng.choice(words) for _ in range(9)) for _ in range(50)]
    hf.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<unk>", "</s>"], show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    prompt, completion = tok.encode("alpha beta"), tok.encode(" gamma mu delta")
    expected = tok.decode(prompt + completion)[len(tok.decode(prompt)):]
    assert expected.startswith(" gamma")
    assert decode_completion(tok, completion, context=prompt) == expected
    pieces, tail = stream_pieces(tok, completion, context=prompt)
    assert "".join(pieces) + tail == expected


@pytest.mark.parametrize("chunks,stops,emitted,stopped", [
    (["hello wor", "ld!"], ["world"], ["hello ", ""], True),           # spans two pieces
    (["ab", "c", "abd"], ["abd"], ["", "abc", ""], True),               # partial, then miss
    (["xaa", "ab tail"], ["aab"], ["x", "a"], True),                    # overlapping prefix
    (["one\n\ntwo"], ["\n", "\n\n"], ["one"], True),                    # earliest stop wins
    (["é€", "😀x"], ["€😀"], ["é", ""], True),                        # multi-byte characters
    (["no stop ", "here"], ["END"], ["no stop ", "here"], False),
    (["keeps E", "N"], ["END"], ["keeps ", ""], False),                 # held at the end
])
def test_stop_matcher(chunks, stops, emitted, stopped):
    m = StopMatcher(stops)
    assert [m.push(c) for c in chunks] == emitted
    assert m.stopped == stopped
    tail = m.flush()
    assert tail == ("" if stopped else "".join(chunks)[len("".join(emitted)):])
    if stopped:
        assert m.push("more") == ""


def test_stop_matcher_rejects_empty_stop_strings():
    with pytest.raises(TokenizerError, match="non-empty str"):
        StopMatcher(["ok", ""])


def test_text_stream_ends_at_a_stop_id_or_stop_string(tok):
    ids = tok.encode("answer: 42€;\nnext")
    full = tok.decode(ids)
    s = TextStream(tok, stop_strings=[";\n"])
    out = "".join(s.push(i) for i in ids)
    assert s.finished and out == full[:full.index(";\n")]
    assert s.push(ids[0]) == "" and s.finish() == ""

    eos = tok.eos_id
    cut = len(tok.encode("answer: 4"))
    s = TextStream(tok, stop_ids=[eos])
    out = "".join(s.push(i) for i in ids[:cut] + [eos] + ids[cut:])
    assert s.finished and out == tok.decode(ids[:cut])

    s = TextStream(tok, stop_strings=["zzz"])
    out = "".join(s.push(i) for i in ids) + s.finish()
    assert out == full


def test_decode_completion_matches_the_stream(tok):
    rng = random.Random(9)
    text = random_text(rng, 40) + "STOP" + random_text(rng, 10)
    ids = tok.encode(text)
    assert decode_completion(tok, ids) == text
    assert decode_completion(tok, ids, stop_strings=["STOP"]) == text[:text.index("STOP")]
    cut_in_a_character = ByteTokenizer().encode("hél") + [0xC3]
    assert decode_completion(ByteTokenizer(), cut_in_a_character) == "hél\ufffd"
    assert decode_completion(ByteTokenizer(), [104, BYTE_EOS, 105], stop_ids=[BYTE_EOS]) == "h"
