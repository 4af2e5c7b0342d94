"""The CLIP tokenizer against ids of the real one.

The expected ids were produced by transformers' (slow) `CLIPTokenizer` for
openai/clip-vit-large-patch14 with ftfy installed, called as ControlNet's FrozenCLIPEmbedder
calls it (truncation=True, max_length=77, padding="max_length"). The instant-clip-tokenizer
back-end is tested explicitly, with and without ftfy, so that the tests mean the same on a
machine that happens to have the Hugging Face files cached.
"""
import importlib.util
import sys

import pytest
import torch

from sdcanny import tokenizer as tokenizer_module
from sdcanny.tokenizer import BOS, EOS, ClipTokenizer, load_tokenizer

INSTANT = "instant-clip-tokenizer"


def _without_ftfy():
    """A fresh copy of the module that cannot import ftfy, so it uses its own stand-in."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` raise ImportError
        spec = importlib.util.spec_from_file_location("tokenizer_no_ftfy", tokenizer_module.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.ClipTokenizer(backend=INSTANT)


@pytest.fixture(scope="module", params=["ftfy-if-installed", "no-ftfy"])
def tok(request):
    return ClipTokenizer(backend=INSTANT) if request.param == "ftfy-if-installed" else _without_ftfy()


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


def test_max_length():
    out = ClipTokenizer(max_length=5, backend=INSTANT)(["a bird, best quality", "a"])
    assert out.tolist() == [[BOS, 320, 3329, 267, EOS], [BOS, 320, EOS, EOS, EOS]]


def test_load_tokenizer_picks_a_working_backend():
    tok = load_tokenizer()
    assert tok.backend in ("huggingface", INSTANT) and tok.max_length == 77
    assert tok(["a bird, best quality, extremely detailed"])[0].tolist() == row(KNOWN[1][1])
