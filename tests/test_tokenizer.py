"""Tokenizer: ids equal `tokenizers`' own output of ChatTTS's tokenizer.json; the generated one has the ids."""
import pytest

from chattts_ort.config import ADDED_TOKENS
from chattts_ort.params import build_prompt_code, build_prompt_refine
from chattts_ort.tokenizer import Tokenizer

SENTENCES = [
    "四川美食确实以辣闻名，但也有不辣的选择。",
    "Hello world [uv_break] this is chat T T S [laugh] speaking.",
    "[Stts][spk_emb][speed_5]今天天气不错[uv_break]我们出去走走吧[Ptts]",
    "[Sbreak]What a nice day, isn't it?[Pbreak][oral_2][laugh_0][break_6]",
    "数字 123 和 English mixed 在一起 [lbreak]",
]


def test_real_tokenizer_matches_tokenizers_library(chattts_asset_dir):
    from tokenizers import Tokenizer as HF

    path = chattts_asset_dir / "tokenizer" / "tokenizer.json"
    ref = HF.from_file(str(path))
    ref.no_padding()
    ref.no_truncation()
    ours = Tokenizer(path)
    for s in SENTENCES:
        want = ref.encode(s, add_special_tokens=False).ids
        assert ours.encode(s) == want, s
        assert 0 not in want  # no padding crept in
    assert ours.encode("[uv_break]") == [ADDED_TOKENS["[uv_break]"]]
    ids = ours.encode(build_prompt_code("你好", True, None, "[speed_5]"))
    assert ids[:3] == [21131, 21143, 21173] and ids[-1] == 21132


def test_added_token_table_matches_real_file(chattts_asset_dir):
    import json

    from chattts_ort.config import BERT_SPECIAL

    data = json.loads((chattts_asset_dir / "tokenizer" / "tokenizer.json").read_text())
    real = {a["content"]: a["id"] for a in data["added_tokens"]}
    assert real == {**BERT_SPECIAL, **ADDED_TOKENS}
    assert len(ADDED_TOKENS) == 50


def test_bad_tokenizer_file(tmp_path):
    from chattts_ort.errors import AssetError

    with pytest.raises(AssetError, match="not found"):
        Tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(AssetError, match="bad.json"):
        Tokenizer(bad)
