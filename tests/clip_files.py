"""A Hugging Face cache holding openai/clip-vit-large-patch14's vocab.json and merges.txt, made
from OpenAI's BPE merges file `bpe_simple_vocab_16e6.txt.gz`, as HF made its files from it.

No weights or tokenizer files can be downloaded here; the merges file ships inside the
open_clip_torch wheel, which .ci/run fetches (pip download, no install) and names in
SDCANNY_CLIP_BPE. The vocabulary order below is OpenAI's simple_tokenizer's: the 256 byte
characters in GPT-2's table order, the same with `</w>`, one token per merge, then the two
special tokens, 49408 in all.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

HF_REPO_DIR = "models--openai--clip-vit-large-patch14"
REVISION = "0" * 40


def byte_characters_in_gpt2_order() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def bpe_source() -> Path | None:
    path = os.environ.get("SDCANNY_CLIP_BPE")
    return Path(path) if path and Path(path).is_file() else None


def make_hub_cache(bpe_gz: Path, hub_dir: Path) -> Path:
    """Writes <hub_dir>/models--openai--clip-vit-large-patch14/{refs/main, snapshots/<rev>/...}."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = byte_characters_in_gpt2_order()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408
    repo = hub_dir / HF_REPO_DIR
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    (snapshot / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (snapshot / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                         encoding="utf-8")
    return hub_dir


if __name__ == "__main__":  # python3 tests/clip_files.py BPE_GZ HUB_DIR: a cache as the docker has it
    import sys
    print(make_hub_cache(Path(sys.argv[1]), Path(sys.argv[2])))
