"""Text in, text out: the layer between a tokenizer and the runtime's token ids.

* ``encode_prompts``: one prompt or a list of prompts -> one id list per prompt.
* ``Detokenizer``: ids pushed one at a time -> text pieces holding only complete
  characters. A character whose bytes are split across tokens (the byte tokenizer, or a
  byte-level BPE splitting an emoji) is held back until its last byte arrives, so every
  piece is valid UTF-8 and the pieces concatenate to the one-shot decode.
* ``StopMatcher``: text pieces -> text up to the first stop string. The longest tail
  that could still begin a stop string is held back; a full match ends the stream and
  the stop string itself is not emitted.
* ``TextStream``: one generated row, ids -> pieces, ending at a stop id or stop string;
  ``decode_completion`` is the same for a finished list of ids.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

from .tokenizer import Tokenizer, TokenizerError

# Prompt tokens kept as left context for decoding: tokenizers whose decode of a token
# depends on its neighbour (a SentencePiece "▁word" loses its space at the start of a
# text) then decode the first generated token as it reads after the prompt.
CONTEXT_TOKENS = 4
_INCOMPLETE = "\ufffd"  # what decode() gives for bytes that do not (yet) form a character


def encode_prompts(tokenizer: Tokenizer, prompts: Union[str, Sequence[str]],
                   add_bos: bool = False) -> tuple[list[list[int]], bool]:
    """(ids of each prompt, single): ``single`` is True when one string was given."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        raise TokenizerError("no prompts given (an empty list)")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"prompt {i} is a {type(text).__name__}, not a str")
        ids = tokenizer.encode(text, add_bos=add_bos)
        if not ids:
            raise TokenizerError(f"prompt {i} encodes to no tokens; give a non-empty prompt "
                                 "or add_bos=True")
        out.append(ids)
    return out, single


class Detokenizer:
    """Incremental decoding of one sequence: ``push`` an id, get its complete new text.

    Decodes a short window (the ids since the last emission plus the ones before them) and
    emits what the newest ids added to its text, unless that text ends in U+FFFD, i.e. a
    character still waiting for bytes. ``flush`` ends the sequence, emitting whatever is
    held (an incomplete character becomes U+FFFD). ``context``: prompt ids to decode after.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self._tok = tokenizer
        self._ids = [int(i) for i in context][-CONTEXT_TOKENS:]
        self._start = 0                 # window start
        self._emitted = len(self._ids)  # ids whose text has been emitted (or is context)

    def _new_text(self) -> str:
        before = self._tok.decode(self._ids[self._start:self._emitted])
        return self._tok.decode(self._ids[self._start:])[len(before):]

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        new = self._new_text()
        if not new or new.endswith(_INCOMPLETE):
            return ""
        self._start, self._emitted = self._emitted, len(self._ids)
        return new

    def flush(self) -> str:
        new = self._new_text()
        self._start = self._emitted = len(self._ids)
        return new


class StopMatcher:
    """Cut a stream of text pieces at the first occurrence of any stop string."""

    def __init__(self, stop_strings: Iterable[str] = ()):
        self.stops = list(stop_strings)
        for s in self.stops:
            if not isinstance(s, str) or not s:
                raise TokenizerError(f"stop strings must be non-empty str, got {s!r}")
        self._held = ""
        self.stopped = False

    def _partial(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        for k in range(min(len(text), max(map(len, self.stops), default=1) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def push(self, text: str) -> str:
        """The part of held + text that is certainly not (the start of) a stop string."""
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = self._partial(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held tail, at the end of the stream (it never completed a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class TextStream:
    """One generated row: ids in, text pieces out, until a stop id or stop string.

    The text ends before the stop id or stop string (neither is emitted). After the
    row finishes, ``push`` returns "". Call ``finish`` when generation ends for another
    reason (max tokens) to release held text.
    """

    def __init__(self, tokenizer: Tokenizer, *, stop_strings: Iterable[str] = (),
                 stop_ids: Iterable[int] = (), context: Sequence[int] = ()):
        self._detok = Detokenizer(tokenizer, context)
        self._stops = StopMatcher(stop_strings)
        self._stop_ids = {int(i) for i in stop_ids}
        self.finished = False

    def push(self, token_id: int) -> str:
        if self.finished:
            return ""
        if int(token_id) in self._stop_ids:
            return self.finish()
        piece = self._stops.push(self._detok.push(token_id))
        self.finished = self._stops.stopped
        return piece

    def finish(self) -> str:
        if self.finished:
            return ""
        self.finished = True
        tail = self._stops.push(self._detok.flush())
        return tail + self._stops.flush()


def decode_completion(tokenizer: Tokenizer, ids: Iterable[int], *,
                      stop_strings: Iterable[str] = (), stop_ids: Iterable[int] = (),
                      context: Sequence[int] = ()) -> str:
    """The text of generated ``ids`` as ``TextStream`` streams it, in one string."""
    stream = TextStream(tokenizer, stop_strings=stop_strings, stop_ids=stop_ids,
                        context=context)
    pieces = []
    for token_id in ids:
        pieces.append(stream.push(token_id))
        if stream.finished:
            break
    pieces.append(stream.finish())
    return "".join(pieces)
