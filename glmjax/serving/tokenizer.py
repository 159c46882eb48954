"""The checkpoint's tokenizer and an incremental detokenizer that never emits a broken
UTF-8 character.

`tokenizer.json` (Hugging Face `tokenizers`, GLM's byte-level BPE) is preferred; a
sentencepiece `tokenizer.model` is accepted too. Text is encoded as is: GLM adds no BOS, and
the chat template writes `[gMASK]<sop>` itself.
"""

import os

REPLACEMENT = '\ufffd'  # what decoding an incomplete UTF-8 sequence produces


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, backend, kind: str):
        self._backend, self.kind = backend, kind

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> 'Tokenizer':
        path = os.fspath(path)
        if os.path.exists(os.path.join(path, 'tokenizer.json')):
            return cls.from_file(os.path.join(path, 'tokenizer.json'))
        if os.path.exists(os.path.join(path, 'tokenizer.model')):
            return cls.from_file(os.path.join(path, 'tokenizer.model'))
        raise TokenizerError(f'no tokenizer.json or tokenizer.model in {path}')

    @classmethod
    def from_file(cls, file: str) -> 'Tokenizer':
        if file.endswith('.json'):
            import tokenizers
            return cls(tokenizers.Tokenizer.from_file(file), 'tokenizers')
        import sentencepiece
        return cls(sentencepiece.SentencePieceProcessor(model_file=file), 'sentencepiece')

    @property
    def vocab_size(self) -> int:
        if self.kind == 'tokenizers':
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self.kind == 'tokenizers':
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self.kind == 'tokenizers':
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._backend.decode(ids)

    def token_strings(self, ids: list[int]) -> list[str]:
        if self.kind == 'tokenizers':
            return [self._backend.id_to_token(i) or '' for i in ids]
        return [self._backend.id_to_piece(i) for i in ids]

    def token_id(self, token: str) -> int | None:
        if self.kind == 'tokenizers':
            return self._backend.token_to_id(token)
        i = self._backend.piece_to_id(token)
        return None if i == self._backend.unk_id() and token != '<unk>' else i


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token breaks multi-token characters and, for sentencepiece, spacing;
    so each step decodes a short window and emits only what it adds to the window's previous
    text, holding back while the text ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        # A few prompt tokens as context give the first output token its leading space.
        self.tok = tokenizer
        self.ids = list(context[-4:])
        self.prefix = 0  # start of the window
        self.read = len(self.ids)  # tokens already turned into emitted text

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        """The held-back text at the end of a stream (may contain U+FFFD if the model ended
        inside a character: that is then the text, not a broken encoding)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ''
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return delta
