"""The CLIP tokenizer against ids of the real one.

The expected ids were produced by transformers' (slow) `CLIPTokenizer` for
openai/clip-vit-large-patch14 with ftfy installed, called as ControlNet's FrozenCLIPEmbedder
calls it (truncation=True, max_length=77, padding="max_length"). The instant-clip-tokenizer
back-end is tested explicitly, with and without ftfy, and so is the "hf-files" back-end (our
BPE over the Hugging Face files, as the hackathon docker has them cached), so that the tests
mean the same on any machine.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import re
import sys
import unicodedata

import pytest
import torch

from sdcanny import clip_bpe
from sdcanny import tokenizer as tokenizer_module
from sdcanny.tokenizer import BOS, EOS, TOKENIZER_BACKENDS, ClipTokenizer, load_tokenizer

INSTANT = "instant-clip-tokenizer"
HAS_INSTANT = importlib.util.find_spec("instant_clip_tokenizer") is not None
needs_instant = pytest.mark.skipif(not HAS_INSTANT, reason="instant-clip-tokenizer (optional) is not installed")


def _without_ftfy():
    """A fresh copy of the module that cannot import ftfy, so it uses its own stand-in."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` raise ImportError
        spec = importlib.util.spec_from_file_location("sdcanny._tokenizer_no_ftfy", tokenizer_module.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.ClipTokenizer(backend=INSTANT)


@pytest.fixture(scope="session")
def hf_files_tokenizer(hf_hub_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(hf_hub_cache))
        return ClipTokenizer(backend="hf-files")


@pytest.fixture(scope="module", params=[pytest.param("instant", marks=needs_instant),
                                        pytest.param("instant-no-ftfy", marks=needs_instant), "hf-files"])
def tok(request):
    if request.param == "hf-files":
        return request.getfixturevalue("hf_files_tokenizer")
    return ClipTokenizer(backend=INSTANT) if request.param == "instant" else _without_ftfy()


def row(ids):
    """A 77-id row as HF pads it: with <|endoftext|>, the model's pad token."""
    return ids + [EOS] * (77 - len(ids))


# (prompt, HF ids up to and including the first EOS)
KNOWN = [
    ("a bird", [BOS, 320, 3329, EOS]),
    ("a bird, best quality, extremely detailed",
     [BOS, 320, 3329, 267, 949, 3027, 267, 6519, 12609, EOS]),
    ("longbody, lowres, bad anatomy, bad hands, missing fingers",
     [BOS, 4792, 1774, 267, 1049, 934, 267, 2103, 15376, 267, 2103, 3500, 267, 3423, 9690, EOS]),
    ("", [BOS, EOS]),
    ("the bird's nest, it's, don't, they're",
     [BOS, 518, 3329, 568, 8719, 267, 585, 568, 267, 847, 713, 267, 889, 982, EOS]),
    ("the bird\u2019s nest", [BOS, 518, 3329, 568, 8719, EOS]),  # ftfy straightens the quote
    ("hello, world!!! (masterpiece:1.2)",
     [BOS, 3306, 267, 1002, 995, 263, 12066, 281, 272, 269, 273, 264, EOS]),
    ("2 cats, 1080p, 3.5", [BOS, 273, 3989, 267, 272, 271, 279, 271, 335, 267, 274, 269, 276, EOS]),
    ("caf\u00e9, cafe\u0301, na\u00efve", [BOS, 15304, 267, 15304, 267, 1097, 35689, 563, EOS]),  # NFC
    ("\U0001F600 \u2728", [BOS, 7334, 3531, EOS]),
    ("\u4e2d\u6587", [BOS, 19759, 255, 29032, 485, EOS]),
    ("a   bird\n\n\tsky  ", [BOS, 320, 3329, 2390, EOS]),
    ("fish &amp; chips", [BOS, 2759, 261, 8855, EOS]),
    ("\ufb01ne \uff21\uff22", [BOS, 3797, 3937, EOS]),  # ligature and full-width letters
    ("\u039f\u0394\u039f\u03a3", [BOS, 138, 123, 138, 112, 138, 123, 139, 480, EOS]),  # final sigma
    ("<start_of_text> x", [BOS, 283, 1572, 318, 539, 318, 4160, 285, 343, EOS]),  # plain text to HF
]


@pytest.mark.parametrize("prompt,ids", KNOWN, ids=[repr(p)[:40] for p, _ in KNOWN])
def test_known_ids(tok, prompt, ids):
    assert tok([prompt])[0].tolist() == row(ids)


def test_batch_shape_dtype_and_padding(tok):
    out = tok(["a bird", "longbody, lowres, bad anatomy, bad hands, missing fingers", ""])
    assert out.dtype == torch.int64 and out.shape == (3, 77)
    assert out[0].tolist() == row([BOS, 320, 3329, EOS])
    assert out[2].tolist() == [BOS] + [EOS] * 76


def test_long_prompt_is_truncated_to_bos_75_ids_eos(tok):
    out = tok(["a bird, best quality, extremely detailed, " * 12])  # 108 BPE ids
    pattern = [320, 3329, 267, 949, 3027, 267, 6519, 12609, 267]
    assert out.shape == (1, 77)
    assert out[0].tolist() == [BOS] + (pattern * 9)[:75] + [EOS]


def test_special_token_strings_in_the_text(tok):
    # HF gives <|startoftext|> / <|endoftext|> written in a prompt their ids, in any case.
    assert tok(["a<|endoftext|>b"])[0].tolist() == row([BOS, 320, EOS, 321, EOS])
    assert tok(["<|startoftext|>a bird"])[0].tolist() == row([BOS, BOS, 320, 3329, EOS])
    assert tok(["a<|EndOfText|>b"])[0].tolist() == row([BOS, 320, EOS, 321, EOS])


def test_case_insensitive(tok):
    out = tok(["A BIRD, Best Quality", "a bird, best quality", "a BiRd, bEST qUALITY"])
    assert (out == out[1]).all()


def test_non_string_prompt_raises(tok):
    for bad in ([None], ["a bird", 3], [b"a bird"]):
        with pytest.raises(ValueError, match="must be a str"):
            tok(bad)


def test_a_single_string_is_one_prompt(tok):
    assert tok("a bird").tolist() == [row([BOS, 320, 3329, EOS])]


def test_max_length(hf_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_hub_cache))
    tok = ClipTokenizer(max_length=5, backend="hf-files")
    out = tok(["a bird, best quality", "a"])
    assert out.tolist() == [[BOS, 320, 3329, 267, EOS], [BOS, 320, EOS, EOS, EOS]]


def test_load_tokenizer_picks_a_working_backend(hf_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_hub_cache))
    tok = load_tokenizer()
    assert tok.backend in TOKENIZER_BACKENDS and tok.max_length == 77
    assert tok(["a bird, best quality, extremely detailed"])[0].tolist() == row(KNOWN[1][1])


def _random_prompts(count: int, seed: int = 0) -> list:
    """Prompts mixing ASCII words, punctuation, digits, accents, CJK, emoji and odd whitespace."""
    import random
    rng = random.Random(seed)
    pieces = ["a", "bird", "best", "quality", "Caf\u00e9", "na\u00efve", "\u4e2d\u6587", "\U0001F600", "1080p",
              "3.5", "(masterpiece:1.2)", "don't", "it's", "!!!", "\u00bd", "\u2163", "x\u00b2", "\u0645\u0631\u062d\u0628\u0627",
              "\u0434\u043e\u043c", "&amp;", "\t", "  ", "\n", "o\u0308", "\u00df", "\ufb01", "longbody,", "hands"]
    return [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(count)]


@needs_instant
def test_hf_files_bpe_equals_instant_clip_tokenizer(hf_files_tokenizer):
    """Two independent BPE implementations over the same merges agree prompt for prompt."""
    prompts = _random_prompts(300)
    assert hf_files_tokenizer(prompts).tolist() == ClipTokenizer(backend=INSTANT)(prompts).tolist()


def test_hf_files_are_found_in_each_cache_location(hf_hub_cache, monkeypatch, tmp_path):
    from sdcanny.clip_bpe import find_tokenizer_files
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # nothing in ~/.cache
    assert find_tokenizer_files() is None
    monkeypatch.setenv("HF_HOME", str(hf_hub_cache.parent))  # HF_HOME/hub
    assert find_tokenizer_files() == next((hf_hub_cache / "models--openai--clip-vit-large-patch14" / "snapshots").iterdir())
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(hf_hub_cache))
    assert find_tokenizer_files() is not None


def test_no_tokenizer_at_all_says_what_to_provide(monkeypatch, tmp_path):
    import sdcanny.tokenizer as t
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(RuntimeError, match="vocab.json and merges.txt"):
        ClipTokenizer(backend="hf-files")
    with pytest.raises(ValueError, match="unknown tokenizer backend"):
        ClipTokenizer(backend="sentencepiece")
    assert set(t.TOKENIZER_BACKENDS) == {"huggingface", "hf-files", INSTANT}


@pytest.fixture
def transformers_present(monkeypatch):
    """transformers looks installed (to find_spec) but cannot be imported: a loader that got as far
    as importing it would answer that it cannot load, not why it does not fit."""
    real_find_spec = importlib.util.find_spec
    present = {"transformers", "ftfy"}

    def find_spec(name, *args):
        return importlib.machinery.ModuleSpec(name, None) if name in present else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    return present


def test_transformers_without_ftfy_is_passed_over_without_importing_it(transformers_present):
    transformers_present.discard("ftfy")
    tokenizer, why = tokenizer_module._load_transformers()
    assert tokenizer is None and why.startswith("ftfy is not installed")


@pytest.mark.parametrize(("version", "passed_over"), [("5.0.1", True), ("4.38.2", False)])
def test_transformers_5_is_passed_over_without_importing_it(transformers_present, monkeypatch, version, passed_over):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    tokenizer, why = tokenizer_module._load_transformers()
    assert tokenizer is None
    if passed_over:
        assert why == f"transformers {version}'s CLIPTokenizer (the Rust one, no ftfy) does not give ControlNet's ids"
    else:  # 4.x with ftfy: only the import and the probe can tell, and the import fails here
        assert why.startswith("transformers cannot load")


def test_category_classes_hold_exactly_the_code_points_of_their_category():
    letters, numbers = (re.compile(f"[{chars}]") for chars in clip_bpe._category_classes("LN"))
    for cp in [*range(0, 0x3000), *range(0x3000, sys.maxunicode + 1, 37)]:
        major = unicodedata.category(chr(cp))[0]
        assert (letters.fullmatch(chr(cp)) is not None, numbers.fullmatch(chr(cp)) is not None) == \
            (major == "L", major == "N"), hex(cp)
