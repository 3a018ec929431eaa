"""Word-level tokenizer built offline with the `tokenizers` package and saved as tokenizer.json.

The splitting rule is SynthVQA's `tokenize_words`: lower-case, split on whitespace, strip the
characters ?,. from both ends of each word, drop empty words (expressed as tokenizers
normalizers so the saved tokenizer.json applies it on its own). Words outside the vocabulary map
to <unk>. Decoding joins words with single spaces, which is how SynthVQA answers are written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from envs.backends.vlm.config import TOKENIZER_FILE

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, EOS)
# ?,. runs touching a word's end, then its start, become spaces (a space is a word boundary).
_TRAILING_PUNCT = r"[?,.]+(\s|$)"
_LEADING_PUNCT = r"(^|\s)[?,.]+"


class WordTokenizer:
    """Thin wrapper giving the ids the model needs (pad, eos) by name."""

    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer"):
        self._tok = tokenizer
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{source}: special token(s) {missing} missing from the vocabulary")
        self.pad_id, self.unk_id, self.eos_id = (vocab[t] for t in SPECIAL_TOKENS)
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def build(cls, words: Iterable[str]) -> "WordTokenizer":
        """A tokenizer whose vocabulary is the special tokens then `words` (split, lower-cased, sorted)."""
        normalizer = normalizers.Sequence(
            [
                normalizers.Lowercase(),
                normalizers.Replace(Regex(_TRAILING_PUNCT), " "),
                normalizers.Replace(Regex(_LEADING_PUNCT), " "),
            ]
        )
        pre = pre_tokenizers.WhitespaceSplit()
        pieces = set()
        for word in words:
            for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(word)):
                pieces.add(piece)
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for piece in sorted(pieces - set(SPECIAL_TOKENS)):
            vocab[piece] = len(vocab)
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre
        tok.add_special_tokens(list(SPECIAL_TOKENS))  # already in the vocab; marks them skippable
        return cls(tok)

    @classmethod
    def load(cls, model_dir: str | Path) -> "WordTokenizer":
        path = Path(model_dir) / TOKENIZER_FILE
        return cls(read_tokenizer_file(path), source=str(path))

    def save(self, model_dir: str | Path) -> None:
        self._tok.save(str(Path(model_dir) / TOKENIZER_FILE))

    def vocabulary(self) -> dict[str, int]:
        """word -> id, special tokens included."""
        return self._tok.get_vocab()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def read_tokenizer_file(path: Path) -> Tokenizer:
    """A `tokenizers` JSON file; a missing or malformed file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"tokenizer file {path} cannot be parsed: {err}") from None
