"""ChatTTS's text front-end (the `Normalizer` that runs before tokenization), without torch, numpy or numba.

    norm = Normalizer()                      # homophone map of the installed `chattts` package, if any
    norm("今天是2026年12月3日，气温-5°C。")    # -> "今天是年月日，气温，C。"  (no number normalizer: digits go)
    norm = default_normalizer()              # + WeTextProcessing (zh) / nemo_text_processing (en) if installed

The output is the string ChatTTS 0.2.5's `ChatTTS.norm.Normalizer` returns for the same text, options, homophone
map and registered normalizers (tests/test_frontend.py checks this against ChatTTS itself). The steps:

1. text normalization (`do_text_normalization`): the language is `lang`, or detected ("zh" when the text has more
   CJK ideographs than ASCII words, else "en"). A normalizer registered under that name is applied to each text
   piece between bracket tags, and the pieces and tags are put back together the way ChatTTS does (see
   `_split_pieces` / `_join_pieces`: its scanner's odd corners are kept on purpose). For "zh", ASCII punctuation
   then becomes full-width.
2. if the text (bracket tags like "[uv_break]" left out) holds characters outside CJK ideographs, ASCII letters,
   "，。、,. " and space, they are logged as invalid and a few punctuation marks are mapped to commas/periods.
3. homophone replacement (`do_homophone_replacement`): characters ChatTTS mispronounces become homophones it reads
   right, one character at a time (ChatTTS does this on UTF-16 code units; every key and value of the map is a
   single BMP character, so per-character replacement is the same thing).
4. if step 2 found invalid characters, they are removed from the text pieces (tags are kept).

Where ChatTTS fails with an incidental exception this raises `ValueError` with a message saying why:

* empty text while a normalizer is registered for its language (ChatTTS: IndexError);
* text holding a surrogate code point (U+D800..U+DFFF, i.e. a lone surrogate from a bad decode) with homophone
  replacement on (ChatTTS: UnicodeEncodeError from encoding the text as UTF-16). This is raised whenever
  `do_homophone_replacement` is true, also when no homophone map is loaded, so the outcome depends only on the
  text and the options. With replacement off the surrogate is an invalid character and is removed, as in ChatTTS;
* a registered normalizer returning something other than a string for a text piece.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

__all__ = ["Normalizer", "number_normalizers", "default_normalizer", "chattts_homophones_path"]

_LOG = logging.getLogger("chattts_ort.frontend")

# --- ChatTTS's tables and patterns (facts of ChatTTS 0.2.5's norm.py) -------------------------------------------

# Characters ChatTTS keeps; everything else in a text piece is "invalid".
_INVALID = re.compile(r"[^\u4e00-\u9fffA-Za-z，。、,\. ]")
# What counts as a tag when looking for invalid characters (a tag's inside is not checked).
_TAG = re.compile(r"\[[\w_]+\]")
# Language detection: CJK ideographs against ASCII words (\b is Unicode-aware: "abc中" holds no word).
_CJK_CHAR = re.compile(r"[\u4e00-\u9fff]")
_ASCII_WORD = re.compile(r"\b[A-Za-z]+\b")


def _full_width_table() -> Dict[int, str]:
    # For "zh" text: ASCII punctuation -> its full-width form (U+FF01..U+FF5E is ASCII + 0xFEE0), except that
    # quotes become curly quotes and the period becomes the ideographic full stop. "[", "]" and "_" stay (tags).
    marks = "!\"'#$%&(),-*+./:;<=>?@\\^`{|}~"
    special = {'"': "\u201c", "'": "\u2018", ".": "\u3002"}
    return {ord(c): special.get(c, chr(ord(c) + 0xFEE0)) for c in marks}


def _simplifier_table() -> Dict[int, str]:
    # Applied when invalid characters were found: pausing punctuation -> comma, exclamation -> period, in the
    # width the mark had.
    table = {ord(c): "，" for c in "：；（）【】『』「」《》－"}
    table[ord("！")] = "。"
    table.update({ord(c): "," for c in ":;()><-"})
    table[ord("!")] = "."
    return table


_HALF_TO_FULL = _full_width_table()
_SIMPLIFY = _simplifier_table()

_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SCAN = re.compile(r"[\[\]]|[^\[\]]+")

# --- splitting text at bracket tags, ChatTTS's way ------------------------------------------------------------


def _split_pieces(text: str) -> Tuple[List[str], List[str]]:
    """Text pieces and tags, as ChatTTS's scanner finds them.

    Every "[" closes the current piece (recording it even when empty) and opens a tag, dropping any tag still
    open. A "]" closes the open tag; with no tag open it stays in the piece and records an empty tag. At the end
    an open tag is dropped and the last piece is recorded only when non-empty. Tags are not matched to the
    pieces they followed: `_join_pieces` pairs them by position.
    """
    pieces: List[str] = []
    tags: List[str] = []
    piece = ""
    open_tag: Optional[str] = None
    for m in _SCAN.finditer(text):
        tok = m.group()
        if tok == "[":
            pieces.append(piece)
            piece, open_tag = "", "["
        elif tok == "]":
            if open_tag is None:
                piece += "]"
                tags.append("")
            else:
                tags.append(open_tag + "]")
                open_tag = None
        elif open_tag is None:
            piece += tok
        else:
            open_tag += tok
    if piece:
        pieces.append(piece)
    return pieces, tags


def _join_pieces(pieces: List[str], tags: List[str]) -> str:
    """Piece i followed by tag i; tags beyond the last piece are lost. With no tag at all only the first piece
    is kept (which is the whole text unless a normalizer turned an empty piece into something)."""
    if not tags:
        return pieces[0]
    return "".join(p + (tags[i] if i < len(tags) else "") for i, p in enumerate(pieces))


# --- the homophone map -------------------------------------------------------------------------------------------


def chattts_homophones_path() -> Optional[Path]:
    """ChatTTS/res/homophones_map.json of the installed `chattts` package, found without running the package's
    __init__ (which needs torch and torchaudio); None when it is not installed."""
    folders: List[str] = []
    mod = sys.modules.get("ChatTTS")
    if mod is not None:
        folders += list(getattr(mod, "__path__", None) or [])
    if not folders:
        try:
            spec = importlib.util.find_spec("ChatTTS")
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            folders += list(spec.submodule_search_locations or [])
    for folder in folders:
        path = Path(folder) / "res" / "homophones_map.json"
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=8)
def _read_homophones(path: str, _mtime_ns: int, _size: int) -> Dict[int, str]:
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"homophone map {path}: expected a JSON object of character -> character")
    table: Dict[int, str] = {}
    for k, v in data.items():
        ok = (isinstance(v, str) and len(k) == 1 and len(v) == 1
              and all(ord(c) <= 0xFFFF and not 0xD800 <= ord(c) <= 0xDFFF for c in k + v))
        if not ok:
            # ChatTTS would fail to load a multi-character entry and silently mis-handle characters outside the
            # BMP (its table holds UTF-16 code units); neither is a map worth using.
            raise ValueError(f"homophone map {path}: entry {k!r}: {v!r} is not one BMP character -> one BMP character")
        table[ord(k)] = v
    return table


def _load_homophones(path: Union[str, os.PathLike]) -> Dict[int, str]:
    p = Path(path)
    st = p.stat()
    return _read_homophones(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _note_no_chattts() -> None:
    _LOG.info("the chattts package is not installed: no homophone map, homophone replacement is a no-op")


# --- the normalizer ------------------------------------------------------------------------------------------------


class Normalizer:
    """ChatTTS's text normalizer: `Normalizer()(text)` gives the text ChatTTS would tokenize.

    homophones: "auto" (the map of the installed `chattts` package, or none), a path to a JSON object of
    character -> character, or None (no replacement).
    """

    def __init__(self, homophones: Union[None, str, os.PathLike] = "auto", logger: Optional[logging.Logger] = None):
        self.logger = logger if logger is not None else _LOG
        self.normalizers: Dict[str, Callable[[str], str]] = {}
        self.homophones_path: Optional[Path] = None
        if isinstance(homophones, str) and homophones == "auto":
            self.homophones_path = chattts_homophones_path()
            if self.homophones_path is None:
                _note_no_chattts()
        elif homophones is not None:
            self.homophones_path = Path(homophones)
        self._homophones: Dict[int, str] = _load_homophones(self.homophones_path) if self.homophones_path else {}

    # registration, as ChatTTS: a name once, and a function that maps its test string to a string
    def register(self, name: str, fn: Callable[[str], str]) -> bool:
        if name in self.normalizers:
            self.logger.warning("name %s has been registered", name)
            return False
        try:
            out = fn("test string 测试字符串")
        except Exception as e:  # noqa: BLE001 (ChatTTS refuses any failing normalizer)
            self.logger.warning("normalizer %s failed on the test string: %r", name, e)
            return False
        if not isinstance(out, str):
            self.logger.warning("normalizer %s must map str -> str, it returned %s", name, type(out).__name__)
            return False
        self.normalizers[name] = fn
        return True

    def unregister(self, name: str) -> None:
        self.normalizers.pop(name, None)

    @staticmethod
    def detect_language(text: str) -> str:
        """ "zh" when CJK ideographs outnumber ASCII words, else "en" (also for text with neither)."""
        return "zh" if len(_CJK_CHAR.findall(text)) > len(_ASCII_WORD.findall(text)) else "en"

    def __call__(self, text: str, do_text_normalization: bool = True, do_homophone_replacement: bool = True,
                 lang: Optional[str] = None) -> str:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        if do_text_normalization:
            language = self.detect_language(text) if lang is None else lang
            fn = self.normalizers.get(language)
            if fn is not None:
                text = self._run_normalizer(language, fn, text)
            if language == "zh":
                text = text.translate(_HALF_TO_FULL)
        invalid = set(_INVALID.findall(_TAG.sub("", text)))
        if invalid:
            self.logger.warning("found invalid characters: {%s}", ", ".join(repr(c) for c in sorted(invalid)))
            text = text.translate(_SIMPLIFY)
        if do_homophone_replacement:
            text = self._replace_homophones(text)
        if invalid:
            pieces, tags = _split_pieces(text)
            text = _join_pieces([_INVALID.sub("", p) for p in pieces], tags)
        return text

    def _run_normalizer(self, language: str, fn: Callable[[str], str], text: str) -> str:
        pieces, tags = _split_pieces(text)
        if not pieces:  # only the empty text has no piece
            raise ValueError(f"cannot normalize an empty text with the {language!r} normalizer registered "
                             "(ChatTTS fails here with IndexError); skip empty texts or pass do_text_normalization=False")
        out = []
        for p in pieces:
            r = fn(p)
            if not isinstance(r, str):
                raise ValueError(f"normalizer {language!r} returned {type(r).__name__} for {p!r}, not a str")
            out.append(r)
        self.logger.debug("normalized pieces %r, tags %r", out, tags)
        return _join_pieces(out, tags)

    def _replace_homophones(self, text: str) -> str:
        m = _SURROGATE.search(text)
        if m is not None:
            raise ValueError(
                f"text holds the surrogate code point U+{ord(m.group()):04X} at index {m.start()}: it is not valid "
                "Unicode text and cannot be encoded as UTF-16 for homophone replacement (ChatTTS raises "
                "UnicodeEncodeError here); fix the text's decoding or pass do_homophone_replacement=False")
        table = self._homophones
        if not table:
            return text
        hits = [(c, table[ord(c)]) for c in text if ord(c) in table]
        if not hits:
            return text
        self.logger.info("replace homophones: %s", ", ".join(f"{a}->{b}" for a, b in hits))
        return text.translate(table)


# --- number normalizers: WeTextProcessing (zh), nemo_text_processing (en) -----------------------------------------


@functools.lru_cache(maxsize=None)
def _wetext_zh() -> Optional[Callable[[str], str]]:
    try:
        from tn.chinese.normalizer import Normalizer as ZhNormalizer
    except ImportError as e:
        _LOG.debug("WeTextProcessing not usable: %s", e)
        return None
    logging.getLogger("wetext").setLevel(logging.WARNING)  # its own handler prints every grammar it loads
    t = time.perf_counter()
    fn = ZhNormalizer(remove_interjections=False).normalize
    _LOG.debug("WeTextProcessing zh normalizer ready in %.2f s", time.perf_counter() - t)
    return fn


@functools.lru_cache(maxsize=None)
def _nemo_en(cache: Optional[str]) -> Optional[Callable[[str], str]]:
    try:
        from nemo_text_processing.text_normalization.normalize import Normalizer as EnNormalizer
    except ImportError as e:
        _LOG.debug("nemo_text_processing not usable: %s", e)
        return None
    t = time.perf_counter()
    norm = EnNormalizer(input_case="cased", lang="en", cache_dir=cache)  # grammars: ~25 s to build, cached after
    _LOG.debug("nemo_text_processing en normalizer ready in %.2f s", time.perf_counter() - t)
    return functools.partial(norm.normalize, verbose=False, punct_post_process=True)


def _nemo_cache_dir() -> str:
    from .defaults import cache_dir

    return str(cache_dir() / "nemo_text_processing")


def number_normalizers(langs=("zh", "en")) -> Dict[str, Callable[[str], str]]:
    """{lang: str -> str} of the number/text normalizers that are installed, as ChatTTS's tools set them up:
    WeTextProcessing's Chinese normalizer for "zh", nemo_text_processing's cased English one for "en" (its
    grammars are cached under the chattts-ort cache folder). Each is built once per process."""
    out: Dict[str, Callable[[str], str]] = {}
    for lang in langs:
        if lang == "zh":
            fn = _wetext_zh()
        elif lang == "en":
            fn = _nemo_en(_nemo_cache_dir())
        else:
            raise ValueError(f"no number normalizer for language {lang!r} (known: 'zh', 'en')")
        if fn is not None:
            out[lang] = fn
    return out


def default_normalizer(homophones: Union[None, str, os.PathLike] = "auto",
                       logger: Optional[logging.Logger] = None) -> Normalizer:
    """A new `Normalizer` with every installed number normalizer registered (see `number_normalizers`)."""
    norm = Normalizer(homophones, logger=logger)
    for lang, fn in number_normalizers().items():
        norm.register(lang, fn)
    return norm
