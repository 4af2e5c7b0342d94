"""CLIP tokenizer of openai/clip-vit-large-patch14, as ControlNet's FrozenCLIPEmbedder calls it.

The reference is `CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")(text,
truncation=True, max_length=77, padding="max_length", ...)["input_ids"]`: `<|startoftext|>`
(49406), the BPE ids truncated so that the row fits, `<|endoftext|>` (49407), then 49407 as
padding (that model's pad token is `<|endoftext|>`) up to 77 ids.

Three back-ends, the first that loads wins (`load_tokenizer`), give those ids without any network
access:

* "huggingface": `transformers.CLIPTokenizer` from files already in the local Hugging Face
  cache, called with exactly ControlNet's arguments. Used whenever it loads and gives
  ControlNet's ids on a probe prompt (see `_PROBE`); not even imported where it cannot (no
  ftfy, or transformers 5).
* "hf-files": the same cached `vocab.json` / `merges.txt` read by our own BPE (sdcanny/clip_bpe.py),
  for the hackathon docker, which has the files but where nothing beyond torch, numpy, opencv and
  onnx may be assumed.
* "instant-clip-tokenizer": the Rust BPE of the `instant-clip-tokenizer` package, which bundles
  OpenAI's `bpe_simple_vocab_16e6.txt`, the very merges HF's vocab.json/merges.txt are made of,
  so that the BPE ids are the same.

The last two only split words and apply BPE; this module adds what HF's slow CLIPTokenizer does
around that: `ftfy.fix_text` (or, without ftfy, its simple parts), whitespace cleaning,
lowercasing, HF's special-token strings, truncation, and padding with 49407 instead of 0.

HF's slow tokenizer runs `ftfy.fix_text` when ftfy is importable (it is in ControlNet's
environment, as a dependency of open_clip_torch) and otherwise BERT's BasicTokenizer, which
also strips accents and splits punctuation; the ftfy behaviour is the one reproduced here.
"""
from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import re
import unicodedata

import torch

from .clip_bpe import ClipBPE, find_tokenizer_files, hub_cache_dirs

BOS, EOS = 49406, 49407
HF_NAME = "openai/clip-vit-large-patch14"

_SPECIAL_IDS = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
_HF_SPECIAL = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")

try:
    from ftfy import fix_text as _fix_text
except ImportError:
    # The deterministic parts of ftfy.fix_text (default settings), in its order. Not covered:
    # its heuristic mojibake repair ("Ã©" -> "é") and all-caps HTML entities ("&EACUTE;").
    _ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
    _ANSI = re.compile(r"\x1b\[((?:\d|;)*)([a-zA-Z])")
    _C1 = {c: bytes([c]).decode("cp1252", "ignore") or chr(c) for c in range(0x80, 0xA0)}
    _LIGATURES = {c: unicodedata.normalize("NFKC", chr(c)) for c in [
        0x132, 0x133, 0x149, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4), *range(0xFB00, 0xFB07)]}
    _LIGATURES[0xFB05] = "\u017ft"  # ftfy keeps the long s of this one
    _WIDTH = {0x3000: " ", **{c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)}}
    _QUOTES = {0x2BC: "'", **dict.fromkeys(range(0x2018, 0x201C), "'"),
               **dict.fromkeys(range(0x201C, 0x2020), '"')}
    _CONTROL = {c: None for c in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                                  *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]}

    def _unescape(match: re.Match) -> str:
        text = html.unescape(match[0])
        return match[0] if ";" in text else text  # only entities decoded whole, as ftfy does

    def _fix_line(line: str) -> str:
        unescape = "<" not in line  # a line with "<" may be HTML source: ftfy leaves its entities
        while True:  # ftfy repeats its fixes until nothing changes
            fixed = _ENTITY.sub(_unescape, line) if unescape else line
            for table in (_C1, _LIGATURES, _WIDTH, _QUOTES):
                fixed = fixed.translate(table)
            fixed = unicodedata.normalize("NFC", _ANSI.sub("", fixed).translate(_CONTROL))
            if fixed == line:
                return line
            line = fixed

    def _fix_text(text: str) -> str:
        return "\n".join(_fix_line(line) for line in text.split("\n"))  # ftfy fixes line by line


def _clean(text: str) -> str:
    """HF's `whitespace_clean(ftfy.fix_text(text)).lower()`, done in Python so it is exactly HF's
    (Rust's `\\s` and lowercasing differ from Python's for a few characters)."""
    text = re.sub(r"\s+", " ", _fix_text(text)).strip().lower()
    # HF's word regex runs with IGNORECASE, and for this one character that makes it match
    # nothing, so HF drops it.
    text = text.replace("\u0345", "")
    # instant-clip-tokenizer turns these two strings into its BOS/EOS ids; HF does not. A space
    # after "<" stops that and splits the text into the same BPE words as HF's regex does.
    for marker in ("<start_of_text>", "<end_of_text>"):
        text = text.replace(marker, "< " + marker[1:])
    return text


# ControlNet's tokenizer (transformers' slow CLIPTokenizer with ftfy) on a curly apostrophe.
# Without ftfy, and with transformers >= 5 (whose CLIPTokenizer is the Rust one, no ftfy),
# HF splits it as punctuation and other prompts differ too; the instant back-end matches.
_PROBE = ("a bird\u2019s nest", [BOS, 320, 3329, 568, 8719, EOS])


def _transformers_mismatch() -> str | None:
    """Why transformers' CLIPTokenizer here cannot give ControlNet's ids, where that is known
    without importing transformers (2-3 s of a start on the H100 machine, which has transformers
    5), else None (the probe decides). The two cases _PROBE's comment names."""
    if importlib.util.find_spec("ftfy") is None:
        return "ftfy is not installed, and without it transformers' CLIPTokenizer does not give ControlNet's ids"
    try:
        version = importlib.metadata.version("transformers")
        major = int(version.split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    if major >= 5:
        return f"transformers {version}'s CLIPTokenizer (the Rust one, no ftfy) does not give ControlNet's ids"
    return None


def _load_transformers():
    """transformers' CLIPTokenizer from the local HF cache, or (None, why not)."""
    if importlib.util.find_spec("transformers") is None:
        return None, "transformers is not installed"
    mismatch = _transformers_mismatch()
    if mismatch is not None:
        return None, mismatch
    try:
        from transformers import CLIPTokenizer
        tokenizer = CLIPTokenizer.from_pretrained(HF_NAME, local_files_only=True)
    except Exception as exc:  # no cached files, or a broken install: OSError, TypeError, ...
        return None, f"transformers cannot load {HF_NAME} offline ({type(exc).__name__})"
    # transformers 5 returns an empty tokenizer when the files are missing, so check what it gives.
    if tokenizer(_PROBE[0])["input_ids"] != _PROBE[1]:
        return None, "transformers' CLIPTokenizer here does not give ControlNet's ids (no ftfy, or transformers 5)"
    return tokenizer, None


def _load_hf_files():
    """Our own BPE over the cached vocab.json / merges.txt (no transformers needed), or (None, why not)."""
    folder = find_tokenizer_files()
    if folder is None:
        return None, f"no {HF_NAME} vocab.json + merges.txt in the Hugging Face cache ({hub_cache_dirs()[0]}, ...)"
    return ClipBPE(folder), None


def _load_instant():
    if importlib.util.find_spec("instant_clip_tokenizer") is None:
        return None, "instant-clip-tokenizer is not installed"
    import instant_clip_tokenizer
    return instant_clip_tokenizer.Tokenizer(), None


# in order of preference: ControlNet's own tokenizer first
_LOADERS = {"huggingface": _load_transformers, "hf-files": _load_hf_files, "instant-clip-tokenizer": _load_instant}
TOKENIZER_BACKENDS = tuple(_LOADERS)


class ClipTokenizer:
    """Prompts -> int64 tensor (len(prompts), max_length) of CLIP token ids."""

    def __init__(self, max_length: int = 77, backend: str | None = None):
        """`backend`: one of TOKENIZER_BACKENDS, or None for the first that loads."""
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        if backend is not None and backend not in _LOADERS:
            raise ValueError(f"unknown tokenizer backend {backend!r}; choose one of {', '.join(_LOADERS)}")
        self.max_length = max_length
        self._hf = self._words = None
        reasons = []
        for name in (backend,) if backend else TOKENIZER_BACKENDS:
            impl, why = _LOADERS[name]()
            if impl is not None:
                self.backend = name
                if name == "huggingface":
                    self._hf = impl
                else:
                    self._words = impl  # .encode(cleaned text) -> BPE ids
                return
            reasons.append(f"{name}: {why}")
        raise RuntimeError("no CLIP tokenizer can be loaded (" + "; ".join(reasons) + "). Put "
                           f"{HF_NAME}'s vocab.json and merges.txt in the Hugging Face cache, or "
                           "pip install instant-clip-tokenizer")

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):  # one prompt; iterating it would tokenize each character
            prompts = [prompts]
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i} must be a str, not {type(prompt).__name__}: {prompt!r}")
        if self._hf is not None:
            return self._hf(prompts, truncation=True, max_length=self.max_length, return_length=True,
                            return_overflowing_tokens=False, padding="max_length",
                            return_tensors="pt")["input_ids"].long()
        ids = torch.full((len(prompts), self.max_length), EOS, dtype=torch.int64)
        for row, prompt in zip(ids, prompts):
            tokens = [BOS, *self._encode(prompt)[: self.max_length - 2], EOS]
            row[: len(tokens)] = torch.tensor(tokens)
        return ids

    def _encode(self, prompt: str) -> list[int]:
        """BPE ids of one prompt, without BOS/EOS or truncation."""
        tokens = []
        # HF splits the raw text on the special-token strings; then its word regex finds them
        # again in each cleaned, lowercased piece ("<|EndOfText|>" too) and maps them to their ids.
        for piece in _HF_SPECIAL.split(prompt):
            for part in _HF_SPECIAL.split(_clean(piece)):
                if part in _SPECIAL_IDS:
                    tokens.append(_SPECIAL_IDS[part])
                elif part:
                    tokens += self._words.encode(part)
        return tokens


def load_tokenizer(max_length: int = 77) -> ClipTokenizer:
    """The first of TOKENIZER_BACKENDS that loads here."""
    return ClipTokenizer(max_length)
