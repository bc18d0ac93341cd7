"""Prompts to token ids (raw or through the chat template) and token ids back to streamed text."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from cake.errors import ModelError

log = logging.getLogger("cake")

# Meta's Llama 3 instruct template, for folders (base models) that ship none.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): printable bytes stand for themselves, the other 68 for the
    characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


BYTE_OF_CHAR = _byte_of_char()


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from transformers import PreTrainedTokenizerFast  # lighter than AutoTokenizer; Llama 3 uses it

        path = Path(model_dir)
        if not (path / "tokenizer.json").exists():
            raise ModelError(f"no tokenizer.json in '{model_dir}'; the master needs the model's tokenizer files")
        self.tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        if not self.tok.chat_template:
            self.tok.chat_template = LLAMA3_CHAT_TEMPLATE
            self.builtin_template = True
        else:
            self.builtin_template = False
        if self.tok.bos_token is None:
            self.tok.bos_token = "<|begin_of_text|>"

    @functools.cached_property
    def cleans_up_spaces(self) -> bool:
        """Whether decode() really applies clean_up_tokenization_spaces (transformers 5 skips it for BPE)."""
        probe = "a . b"
        return self.tok.decode(self.tok.encode(probe, add_special_tokens=False)) != probe

    @functools.cached_property
    def vocab_size(self) -> int:
        """How many token ids there are, special tokens included."""
        return len(self.tok)

    def encode_raw(self, text: str) -> list[int]:
        """Exactly `tokenizer(text)` in transformers: the tokenizer's own special-token rules."""
        return list(self.tok(text)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The rendered text already holds BOS; encode it without adding another (as transformers does).
        return list(self.tok(self.render_chat(messages), add_special_tokens=False)["input_ids"])

    def encode_prompt(self, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
        if raw:
            return self.encode_raw(prompt)
        if self.builtin_template:
            log.info("model folder has no chat template; using the Llama 3 instruct template")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.encode_chat(messages)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @functools.cached_property
    def _added(self) -> dict[int, tuple[str, bool]]:
        """Added tokens (Llama 3's specials among them): id -> (their text, whether decode() skips them)."""
        return {i: (t.content, t.special) for i, t in self.tok.added_tokens_decoder.items()}

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, which may begin or end in the middle of a character (an added
        token: its own text)."""
        added = self._added.get(token_id)
        if added is not None:
            return added[0].encode()
        piece = self.tok.convert_ids_to_tokens(token_id)
        try:  # byte-level BPE (Llama 3): each character of the piece stands for one byte
            return bytes(BYTE_OF_CHAR[c] for c in piece)
        except KeyError:  # another kind of tokenizer: its decoded text
            return self.tok.decode([token_id]).encode()

    def token_text(self, token_id: int) -> str:
        """A token as OpenAI's log-probabilities name it: its text, or for bytes that are not whole
        characters 'bytes:' and the bytes as \\xNN escapes."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def in_text(self, token_id: int) -> bool:
        """Whether decode() shows the token (it leaves special tokens out)."""
        added = self._added.get(token_id)
        return added is None or not added[1]

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get the new text that is final.

    Byte-level BPE tokens can end mid-character; lossy UTF-8 decoding shows an unfinished character as
    one trailing U+FFFD that later bytes may still complete, so that last character is held back. Once
    everything decoded so far is out and ends on a character boundary, later text is decoded from there
    on (byte-level decoding concatenates), so each token costs a short decode, not a decode of the
    whole answer. The concatenation of everything returned, plus `flush()`, equals `decode(all ids)`.

    Tokenizers whose decode() really applies clean_up_tokenization_spaces (" ." -> ".") change text
    across token boundaries; for them the whole answer is decoded each time and text from the last
    space within a few characters of the end is held back.
    """

    HOLD_SPACE = 4  # longest clean-up pattern is " n't"

    def __init__(self, tokenizer: Tokenizer):
        self.decode = tokenizer.decode
        self.cleanup = tokenizer.cleans_up_spaces
        self.ids: list[int] = []
        self.anchor = 0  # ids[:anchor] are decoded and emitted in full
        self.emitted = ""  # what has been emitted of decode(ids[anchor:])

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids[self.anchor:])
        stable = text[:-1] if text.endswith("\ufffd") else text
        if self.cleanup:
            cut = stable.rfind(" ", max(0, len(stable) - self.HOLD_SPACE))
            if cut >= 0:
                stable = stable[:cut]
        new = self._emit(stable)
        if not self.cleanup and self.emitted == text:
            self.anchor, self.emitted = len(self.ids), ""
        return new

    def flush(self) -> str:
        return self._emit(self.decode(self.ids[self.anchor:]))

    def _emit(self, stable: str) -> str:
        if len(stable) <= len(self.emitted) or not stable.startswith(self.emitted):
            return ""
        new = stable[len(self.emitted):]
        self.emitted = stable
        return new
