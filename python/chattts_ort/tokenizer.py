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

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    @property
    def unk_id(self) -> int:
        return BERT_SPECIAL["[UNK]"]


def make_generated_tokenizer(path) -> Path:
    """A tokenizer.json of our own for the random default: BERT-style (lowercase normaliser, BERT
    pre-tokeniser, WordPiece) with a small made-up vocabulary, filler tokens up to 21128 ids, BERT's
    special tokens at 0/100-103 and ChatTTS's 50 added tokens at exactly ChatTTS's ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    base = 21128
    vocab = {}
    for name, i in BERT_SPECIAL.items():
        vocab[name] = i
    pieces = []
    pieces += list("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces += list(".,!?;:'\"()-[]_/%&")
    pieces += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += ["the", "and", "hello", "world", "from", "chat", "##tts", "onnx", "run", "time", "audio",
               "code", "speech", "fast", "stream", "##s", "##ing", "##ed", "##er", "##ly", "core", "test"]
    # Common CJK characters: the BERT pre-tokeniser splits each into its own word.
    pieces += list("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严龙飞")
    seen = set(vocab)
    nxt = 1
    for p in pieces:
        if p in seen:
            continue
        while nxt in vocab.values() or nxt in (0, 100, 101, 102, 103):
            nxt += 1
        vocab[p] = nxt
        seen.add(p)
        nxt += 1
    used = set(vocab.values())
    filler = 0
    for i in range(base):
        if i not in used:
            vocab[f"[unused{filler}]"] = i
            filler += 1
    tok = HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    from tokenizers import AddedToken

    for name, i in sorted(ADDED_TOKENS.items(), key=lambda kv: kv[1]):
        got = tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        if tok.token_to_id(name) != i:
            raise AssertionError(f"generated tokenizer put {name} at {tok.token_to_id(name)}, expected {i} ({got})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
