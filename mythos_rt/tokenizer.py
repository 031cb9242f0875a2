"""Tokenizers: the built-in byte-level one and any Hugging Face ``tokenizer.json``.

Byte tokenizer id layout (``BYTE_VOCAB_SIZE`` = 259 ids)::

    0 .. 255   the bytes of the UTF-8 text, id == byte value
    256        <bos>  (BYTE_BOS)
    257        <eos>  (BYTE_EOS)
    258        <pad>  (BYTE_PAD)

A model using it needs ``vocab_size >= 259``. It is stored in a directory as
``mythos_tokenizer.json`` (``{"kind": "byte", ...}``), so a checkpoint or artifact
directory says which tokenizer it was trained with.

Hugging Face tokenizers are read with the ``tokenizers`` library only (no
``transformers``, no download) from a local ``tokenizer.json`` or a directory holding
one. Their bos/eos/pad ids come from ``tokenizer_config.json`` beside it when present,
otherwise from conventional special-token names found in the vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258
BYTE_VOCAB_SIZE = 259
BYTE_FILE = "mythos_tokenizer.json"  # the built-in tokenizer's file in a directory
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (BYTE_FILE, HF_FILE, HF_CONFIG)  # every file a tokenizer may save

# Special-token spellings of common tokenizers, used only without tokenizer_config.json.
_CONVENTIONAL = {
    "bos": ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[CLS]"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|return|>", "[SEP]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
}


class TokenizerError(ValueError):
    """A tokenizer cannot be found, read or used with a model (names file and problem)."""


class Tokenizer:
    """What mythos-rt asks of a tokenizer: text <-> ids, special ids, a file to carry.

    ``vocab_size`` counts every id the tokenizer can produce (special ids included).
    ``decode`` drops special ids and replaces invalid UTF-8 with U+FFFD.
    """

    vocab_size: int
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, directory: PathLike) -> list[Path]:
        """Write this tokenizer's file(s) into ``directory``; return their paths."""
        raise NotImplementedError

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise TokenizerError(f"{self!r} has no bos token; encode with add_bos=False")
        return [self.bos_id] + ids


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus <bos>=256, <eos>=257, <pad>=258 (module docstring)."""

    vocab_size = BYTE_VOCAB_SIZE
    bos_id, eos_id, pad_id = BYTE_BOS, BYTE_EOS, BYTE_PAD

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    __hash__ = object.__hash__

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self._with_bos(list(text.encode("utf-8")), add_bos)

    def decode(self, ids: Sequence[int]) -> str:
        for i in ids:
            if not 0 <= int(i) < BYTE_VOCAB_SIZE:
                raise TokenizerError(f"id {int(i)} is outside the byte tokenizer's "
                                     f"vocabulary (0..{BYTE_VOCAB_SIZE - 1})")
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: PathLike) -> list[Path]:
        path = Path(directory) / BYTE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = {"kind": "byte", "version": 1, "vocab_size": BYTE_VOCAB_SIZE,
                "bos_id": BYTE_BOS, "eos_id": BYTE_EOS, "pad_id": BYTE_PAD}
        path.write_text(json.dumps(spec, indent=1) + "\n")
        return [path]


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` read from a local ``tokenizer.json``.

    ``special`` maps "bos"/"eos"/"pad" to token strings (from ``tokenizer_config.json``);
    a name it lacks falls back to the conventional spellings in the vocabulary.
    """

    def __init__(self, path: PathLike, special: Optional[dict[str, str]] = None):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:  # pragma: no cover - a declared dependency
            raise TokenizerError("reading tokenizer.json needs the `tokenizers` package "
                                 "(pip install tokenizers)") from None
        self.path = Path(path)
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as exc:  # the Rust library raises its own Exception type
            raise TokenizerError(f"{self.path}: not a readable tokenizer.json: {exc}") from None
        self._config = special or {}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (self._special(k) for k in ("bos", "eos", "pad"))

    def _special(self, kind: str) -> Optional[int]:
        if kind in self._config:
            token = self._config[kind]
            found = self._tok.token_to_id(token)
            if found is None:
                raise TokenizerError(f"{self.path}: {kind} token {token!r} named in "
                                     f"{HF_CONFIG} is not in the vocabulary")
            return found
        for token in _CONVENTIONAL[kind]:
            found = self._tok.token_to_id(token)
            if found is not None:
                return found
        return None

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self._with_bos(self._tok.encode(text, add_special_tokens=False).ids, add_bos)

    def decode(self, ids: Sequence[int]) -> str:
        bad = [int(i) for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise TokenizerError(f"id {bad[0]} is outside {self.path.name}'s vocabulary "
                                 f"(0..{self.vocab_size - 1})")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: PathLike) -> list[Path]:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = [d / HF_FILE]
        self._tok.save(str(paths[0]))
        if self._config:
            paths.append(d / HF_CONFIG)
            config = {f"{k}_token": v for k, v in sorted(self._config.items())}
            paths[1].write_text(json.dumps(config, indent=1) + "\n")
        return paths


def _read_hf_config(path: Path) -> dict[str, str]:
    """bos/eos/pad token strings from a tokenizer_config.json ({"eos_token": str | {content}})."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON: {exc}") from None
    special = {}
    for kind in ("bos", "eos", "pad"):
        value = data.get(f"{kind}_token") if isinstance(data, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[kind] = value
    return special


def _read_byte_spec(path: Path) -> ByteTokenizer:
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON: {exc}") from None
    expected = ByteTokenizer()
    if not isinstance(spec, dict) or spec.get("kind") != "byte":
        raise TokenizerError(f"{path}: expected a byte tokenizer spec (kind 'byte'), "
                             f"found {spec.get('kind') if isinstance(spec, dict) else spec!r}")
    for key in ("vocab_size", "bos_id", "eos_id", "pad_id"):
        if spec.get(key) != getattr(expected, key):
            raise TokenizerError(f"{path}: {key}={spec.get(key)!r} does not match the built-in "
                                 f"byte tokenizer's {getattr(expected, key)}")
    return expected


def load_tokenizer(source: Union[PathLike, Tokenizer]) -> Tokenizer:
    """A tokenizer from ``"byte"``, a tokenizer file, or a directory holding one.

    Files: ``tokenizer.json`` (any name ending in .json that is not the byte spec is read
    as a Hugging Face tokenizer) or ``mythos_tokenizer.json``. A Tokenizer is returned as is.
    """
    if isinstance(source, Tokenizer):
        return source
    if str(source) == "byte":
        return ByteTokenizer()
    path = Path(source)
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            raise TokenizerError(f"{path}: no {HF_FILE} or {BYTE_FILE} in this directory")
        return found
    if not path.is_file():
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    if path.name == BYTE_FILE:
        return _read_byte_spec(path)
    return HFTokenizer(path, _read_hf_config(path.parent / HF_CONFIG))


def find_tokenizer(checkpoint: PathLike) -> Optional[Tokenizer]:
    """The tokenizer saved with a checkpoint, or None when it carries none.

    Looks in the checkpoint directory (or, for a checkpoint file, the directory holding
    it) for ``mythos_tokenizer.json`` then ``tokenizer.json``.
    """
    path = Path(checkpoint)
    directory = path if path.is_dir() else path.parent
    if (directory / BYTE_FILE).is_file():
        return _read_byte_spec(directory / BYTE_FILE)
    if (directory / HF_FILE).is_file():
        return HFTokenizer(directory / HF_FILE, _read_hf_config(directory / HF_CONFIG))
    return None


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """Raise TokenizerError when the tokenizer can produce ids the model has no row for."""
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(
            f"{tokenizer!r} has a vocabulary of {tokenizer.vocab_size} ids but the model's "
            f"vocab_size is {vocab_size}: ids >= {vocab_size} have no embedding row")
    return tokenizer


def resolve_tokenizer(checkpoint: Optional[PathLike], override=None,
                      vocab_size: Optional[int] = None) -> Optional[Tokenizer]:
    """What compile() should use: ``override`` (a Tokenizer, "byte" or a path) when given,
    else the tokenizer found beside ``checkpoint`` (None for none, or for no path), checked
    against the model's ``vocab_size`` when given."""
    if override is not None:
        tok = load_tokenizer(override)
    elif checkpoint is not None:
        tok = find_tokenizer(checkpoint)
    else:
        tok = None
    if tok is not None and vocab_size is not None:
        check_vocab(tok, vocab_size)
    return tok
