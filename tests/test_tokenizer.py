"""mythos_rt.tokenizer: the byte tokenizer, tokenizer.json files, discovery, vocab checks."""

import json
import random

import pytest

from mythos_rt.tokenizer import (BYTE_BOS, BYTE_EOS, BYTE_FILE, BYTE_PAD, BYTE_VOCAB_SIZE,
                                 HF_CONFIG, HF_FILE, ByteTokenizer, HFTokenizer,
                                 TokenizerError, check_vocab, find_tokenizer, load_tokenizer,
                                 resolve_tokenizer)

# Characters of 1, 2, 3 and 4 UTF-8 bytes.
ALPHABET = "ab z.\n" + "éßñ" + "€中ー" + "😀🐍"


def random_text(rng: random.Random, n: int, alphabet: str = ALPHABET) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def make_hf_tokenizer(directory, vocab_size: int = 300, *, config: dict | None = None,
                      alphabet: str = ALPHABET):
    """A byte-level BPE trained here on random text; writes tokenizer.json into directory."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(vocab_size)
    tok.train_from_iterator([random_text(rng, 97, alphabet) for _ in range(40)], trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / HF_FILE))
    if config is not None:
        (directory / HF_CONFIG).write_text(json.dumps(config))
    return directory / HF_FILE


def test_byte_tokenizer_id_layout_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    assert (BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_VOCAB_SIZE) == (256, 257, 258, 259)
    text = random_text(random.Random(7), 53)
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.encode("hé", add_bos=True) == [BYTE_BOS, 104, 0xC3, 0xA9]
    assert tok.decode([BYTE_BOS, 104, BYTE_EOS, 105, BYTE_PAD]) == "hi"  # specials dropped
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # an incomplete character is replaced
    with pytest.raises(TokenizerError, match="id 259 is outside the byte tokenizer"):
        tok.decode([104, 259])


def test_byte_tokenizer_saves_and_is_found(tmp_path):
    (path,) = ByteTokenizer().save(tmp_path / "ckpt")
    assert path.name == BYTE_FILE
    assert load_tokenizer(path) == ByteTokenizer()
    assert load_tokenizer(tmp_path / "ckpt") == ByteTokenizer()
    assert load_tokenizer("byte") == ByteTokenizer()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    assert find_tokenizer(tmp_path / "ckpt") == ByteTokenizer()
    assert find_tokenizer(tmp_path / "ckpt" / "model.safetensors") == ByteTokenizer()
    assert find_tokenizer(tmp_path) is None


def test_byte_spec_mismatch_is_an_error(tmp_path):
    (tmp_path / BYTE_FILE).write_text(json.dumps({"kind": "byte", "vocab_size": 259,
                                                  "bos_id": 1, "eos_id": 257, "pad_id": 258}))
    with pytest.raises(TokenizerError, match="bos_id=1 does not match"):
        load_tokenizer(tmp_path)
    (tmp_path / BYTE_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        find_tokenizer(tmp_path)


def test_hf_tokenizer_json_round_trip_and_special_ids(tmp_path):
    path = make_hf_tokenizer(tmp_path / "hf", 311)
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 311
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(
        hf.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
    text = random_text(random.Random(3), 41)
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [tok.bos_id] + ids
    assert tok.decode([tok.eos_id] + ids) == text
    with pytest.raises(TokenizerError, match="id 311 is outside tokenizer.json's"):
        tok.decode([311])
    # The directory form and find_tokenizer give the same tokenizer.
    assert load_tokenizer(tmp_path / "hf").encode(text) == ids
    assert find_tokenizer(tmp_path / "hf").encode(text) == ids


def test_hf_tokenizer_config_names_special_tokens(tmp_path):
    make_hf_tokenizer(tmp_path / "a", 283, config={"eos_token": {"content": "<s>"},
                                                   "bos_token": "<pad>"})
    tok = load_tokenizer(tmp_path / "a")
    assert tok.eos_id == tok._tok.token_to_id("<s>")
    assert tok.bos_id == tok._tok.token_to_id("<pad>")
    make_hf_tokenizer(tmp_path / "b", 283, config={"eos_token": "<|im_end|>"})
    with pytest.raises(TokenizerError, match="eos token '<|im_end|>' named in"):
        load_tokenizer(tmp_path / "b")


def test_hf_tokenizer_saves_and_reloads(tmp_path):
    make_hf_tokenizer(tmp_path / "src", 290, config={"eos_token": "<pad>"})
    tok = load_tokenizer(tmp_path / "src")
    saved = tok.save(tmp_path / "dst")
    assert [p.name for p in saved] == [HF_FILE, HF_CONFIG]
    again = load_tokenizer(tmp_path / "dst")
    text = random_text(random.Random(11), 67)
    assert again.encode(text) == tok.encode(text)
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_unreadable_or_missing_tokenizer_files(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / HF_FILE).write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path / HF_FILE)
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json or mythos_tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_vocabulary_larger_than_the_model_is_an_error(tmp_path, kind):
    tok = ByteTokenizer() if kind == "byte" else load_tokenizer(make_hf_tokenizer(tmp_path, 307))
    n = tok.vocab_size
    assert check_vocab(tok, n) is tok and check_vocab(tok, n + 13) is tok
    with pytest.raises(TokenizerError, match=f"vocabulary of {n} ids but the model's "
                                             f"vocab_size is {n - 1}"):
        check_vocab(tok, n - 1)


def test_resolve_tokenizer_prefers_the_override_and_checks_the_vocab(tmp_path):
    ByteTokenizer().save(tmp_path / "ckpt")
    hf_path = make_hf_tokenizer(tmp_path / "hf", 263)
    assert resolve_tokenizer(tmp_path / "ckpt") == ByteTokenizer()
    assert isinstance(resolve_tokenizer(tmp_path / "ckpt", hf_path, 263), HFTokenizer)
    assert resolve_tokenizer(tmp_path / "hf", "byte") == ByteTokenizer()
    assert resolve_tokenizer(None) is None and resolve_tokenizer(tmp_path, None, 5) is None
    with pytest.raises(TokenizerError, match="vocabulary of 259 ids but the model's "
                                             "vocab_size is 97"):
        resolve_tokenizer(tmp_path / "ckpt", vocab_size=97)
