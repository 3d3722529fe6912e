"""Text on its way to the codes: the default model reads any ordinary Chinese and English, the front-end runs as in
ChatTTS's infer(), unknown characters warn (or, strict, refuse), and the refinement feeds the code prompt."""
import json
import logging

import numpy as np
import pytest

from chattts_ort import InferCodeParams, Normalizer, RefineTextParams, Runtime

SENTENCES = ["今天是2026年12月3日，气温-5°C。", "你好欢迎使用实时语音合成",
             "今天天气不错，我们去公园散步吧。欢迎使用实时语音合成！Hello, how are you today?",
             "四川美食确实以辣闻名，但也有不辣的选择。比如甜水面、赖汤圆、蛋烘糕、叶儿粑等，这些小吃口味温和，甜而不腻。"]


@pytest.fixture(scope="module")
def rt(tiny_export):
    return Runtime.load(tiny_export, threads=1, max_context=512)


def test_generated_vocabulary_reads_every_character_the_front_end_lets_through(tiny_export):
    from chattts_ort.tokenizer import Tokenizer

    tok = Tokenizer(tiny_export / "tokenizer.json")
    cjk = "".join(chr(c) for c in range(0x4E00, 0xA000))
    for text in [cjk, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", "，。、,. ",
                 "！？：；（）“”‘’《》【】「」『』－～…·!\"#$%&'()*+-/:;<=>?@\\^_`{|}~", *SENTENCES]:
        ids, unknown = tok.encode_checked(text)
        assert unknown == [] and tok.unk_id not in ids, (text[:30], unknown)
    # each CJK character is its own token, as in BERT's Chinese vocabulary
    assert len(tok.encode(cjk)) == len(cjk)


def test_old_generated_tokenizer_is_replaced(tmp_path, monkeypatch):
    """Random asset folders written before 0.4.0 have a ~500-character vocabulary; their tokenizer is renewed."""
    from chattts_ort.export import sources
    from chattts_ort.export.assets import GENERATED_TOKENIZER_MARK

    monkeypatch.setenv("CHATTTS_ORT_CACHE", str(tmp_path))
    folder = sources.random_asset_folder("tiny")
    path = folder / "tokenizer" / "tokenizer.json"
    doc = json.loads(path.read_text())
    vocab = doc["model"]["vocab"]
    vocab["[old]"] = vocab.pop(GENERATED_TOKENIZER_MARK)  # as the old vocabulary: no 欢
    path.write_text(json.dumps(doc))
    weights = (folder / "gpt" / "model.safetensors").stat().st_mtime_ns
    assert sources.random_asset_folder("tiny") == folder
    assert GENERATED_TOKENIZER_MARK in json.loads(path.read_text())["model"]["vocab"]
    assert (folder / "gpt" / "model.safetensors").stat().st_mtime_ns == weights  # the weights stay


def test_every_sentence_speaks(rt):
    for text in SENTENCES:
        gen = rt.generate(text, params=InferCodeParams(max_new_token=3, min_new_token=3, manual_seed=0))
        assert gen.codes[0].shape == (3, 4)


def test_front_end_runs_before_the_tokenizer(rt):
    plain = Normalizer()
    rt.normalizer = plain  # no number normalizers: ChatTTS's fresh Normalizer
    try:
        text = "今天是2026年12月3日，气温-5°C。"
        assert rt.prepare_text(text) == ["今天是年月日，气温，C。"] == [plain(text)]
        assert rt.prepare_text(text, normalize=False) == [text]
        assert rt.prepare_text("Hello!", lang="zh") == [plain("Hello!", lang="zh")] == ["Hello。"]  # ! -> ！ -> 。
        p = InferCodeParams(max_new_token=4, min_new_token=4, manual_seed=5)
        a = rt.generate(text, params=p).codes[0]
        b = rt.generate("今天是年月日，气温，C。", params=p, normalize=False).codes[0]
        assert np.array_equal(a, b)
        with pytest.raises(ValueError, match="lang"):
            rt.prepare_text("hi", lang="fr")
        rt.normalizer = None
        assert rt.prepare_text(text) == [text]
    finally:
        rt.normalizer = Normalizer()


def test_unknown_characters_warn_or_refuse(tiny_export, caplog):
    text = "hi \U0001F600 there"
    lenient = Runtime.load(tiny_export, threads=1, max_context=128)
    with caplog.at_level(logging.WARNING, logger="chattts_ort"):
        gen = lenient.generate(text, params=InferCodeParams(max_new_token=2, min_new_token=2), normalize=False)
    assert gen.codes[0].shape == (2, 4)
    assert any("\U0001F600" in r.getMessage() and "[UNK]" in r.getMessage() for r in caplog.records)
    strict = Runtime.load(tiny_export, threads=1, max_context=128, strict=True)
    with pytest.raises(ValueError, match="\U0001F600"):
        strict.generate(text, params=InferCodeParams(max_new_token=2), normalize=False)
    # with the front-end (the default) the emoji is removed before the tokenizer, with ChatTTS's warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        strict.generate(text, params=InferCodeParams(max_new_token=2, min_new_token=2))
    assert any("invalid characters" in r.getMessage() and "\U0001F600" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="strict"):
        Runtime.load(tiny_export, strict="yes")


def test_refine_feeds_the_code_prompt(rt):
    rp = RefineTextParams(manual_seed=3, max_new_token=12)
    refined = rt.refine_text("你好，欢迎。", params=rp)
    raw = rt.last_refine_ids[0]
    break_0 = rt.special["break_0"]
    assert refined == rt._tokenizer.decode([i for i in raw if i < break_0])
    p = InferCodeParams(max_new_token=5, min_new_token=5, manual_seed=1)
    if not rt._tokenizer.encode(refined.replace("[", "").replace("]", "")):
        pytest.skip("this seed refines to nothing the code prompt can read")
    a = rt.generate("你好，欢迎。", params=p, refine=rp).codes[0]
    b = rt.generate(refined, params=p, normalize=False).codes[0]
    assert np.array_equal(a, b)
