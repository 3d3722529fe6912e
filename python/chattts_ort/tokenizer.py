"""ChatTTS's tokenizer (BERT WordPiece, lowercase) through the `tokenizers` library.

ChatTTS calls it without [CLS]/[SEP]; its tokenizer.json carries a fixed padding (256) and truncation
setting, which we switch off so a single prompt encodes to exactly its tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from .config import ADDED_TOKENS, BERT_SPECIAL
from .errors import AssetError

VOCAB_SIZE = 21178


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise AssetError(f"{self.path}: tokenizer file not found")
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:
            raise AssetError(f"{self.path}: cannot read tokenizer ({e})") from e
        self._tok.no_padding()
        self._tok.no_truncation()
        vocab = self._tok.get_vocab_size(with_added_tokens=True)
        if vocab != VOCAB_SIZE:
            raise AssetError(f"{self.path}: vocabulary has {vocab} tokens, ChatTTS's has {VOCAB_SIZE}")
        for name, i in ADDED_TOKENS.items():
            if self._tok.token_to_id(name) != i:
                raise AssetError(f"{self.path}: special token {name} is not at id {i}")

    def encode(self, text: str) -> List[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_checked(self, text: str):
        """(ids, the pieces of `text` read as [UNK], in order of appearance and without repeats)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        unk = self.unk_id
        unknown = {text[a:b]: None for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk}
        return list(enc.ids), list(unknown)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    @property
    def unk_id(self) -> int:
        return BERT_SPECIAL["[UNK]"]
