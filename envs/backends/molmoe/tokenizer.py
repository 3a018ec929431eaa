"""The published MolmoE tokenizer (tokenizer.json, read with `tokenizers`) and the prompt format.

    input_ids = [<|endoftext|>] + image tokens + encode(" User: " + prompt + " Assistant:")

as the reference processor builds it (the end-of-text token doubles as BOS; no other special
tokens are added).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer

from envs.backends.molmoe.config import TOKENIZER_FILE
from envs.backends.molmoe.preprocess import ImageTokenIds
from envs.backends.vlm.tokenizer import read_tokenizer_file

EOS_TOKEN = "<|endoftext|>"
IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>")


def chat_prompt(prompt: str) -> str:
    return f" User: {prompt} Assistant:"


class MolmoETokenizer:
    def __init__(self, tokenizer: Tokenizer, source: str):
        self._tok = tokenizer
        found = {name: tokenizer.token_to_id(name) for name in (EOS_TOKEN, *IMAGE_TOKENS)}
        missing = [name for name, i in found.items() if i is None]
        if missing:
            raise ValueError(f"{source}: token(s) {missing} are missing from the vocabulary (not a Molmo tokenizer)")
        self.eos_id = self.bos_id = found[EOS_TOKEN]
        self.image_ids = ImageTokenIds(*(found[name] for name in IMAGE_TOKENS))
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def load(cls, model_dir: str | Path) -> "MolmoETokenizer":
        path = Path(model_dir) / TOKENIZER_FILE
        return cls(read_tokenizer_file(path), str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
