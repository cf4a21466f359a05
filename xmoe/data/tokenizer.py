"""Tokenizers for preprocessing, named by a spec string; none downloads anything.

    byte                       UTF-8 bytes as ids 0-255, EOD = 256 (vocabulary 257)
    hf:PATH/tokenizer.json     a Hugging Face `tokenizers` file; EOD found by name
    hf:PATH/tokenizer.json@TOK the same with the EOD token named explicitly
    gpt2:DIR                   GPT-2 byte-level BPE from DIR/vocab.json and DIR/merges.txt
    gpt2:VOCAB.json,MERGES.txt the same with the two files named

Every tokenizer exposes `encode(text) -> list[int]`, `encode_batch(texts)` (one id sequence
per text), `decode(ids) -> str`, `eod` and
`vocab_size`; preprocessing workers rebuild theirs from the spec, so only the string crosses
process boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path

from xmoe.data.errors import DataError

# Names of end-of-document tokens in common tokenizer.json files, most specific first.
EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")
GPT2_EOD = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes; needs no files, so the shipped corpus and tests always work."""

    eod = 256
    vocab_size = 257
    spec = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[bytes]:
        return [t.encode("utf-8") for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _tokenizers_module():
    try:
        import tokenizers
    except ImportError:
        raise DataError(
            "this tokenizer needs the 'tokenizers' package: pip install 'xmoe[tokenizers]'"
        ) from None
    return tokenizers


class _TokenizersBacked:
    """Encoding through a `tokenizers.Tokenizer` in `self._tok`, special tokens never added."""

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class HFTokenizer(_TokenizersBacked):
    """A local Hugging Face `tokenizer.json` (special tokens not added around documents)."""

    def __init__(self, path: str, eod_token: str | None = None, spec: str = "") -> None:
        tk = _tokenizers_module()
        if not Path(path).is_file():
            raise DataError(f"{path}: tokenizer file not found (hf: needs a local tokenizer.json)")
        try:
            self._tok = tk.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise DataError(
                f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})"
            ) from None
        self.spec = spec or f"hf:{path}"
        vocab = self._tok.get_vocab(with_added_tokens=True)
        names = (eod_token,) if eod_token else EOD_NAMES
        found = next((n for n in names if n in vocab), None)
        if found is None:
            raise DataError(
                f"{path}: no end-of-document token ({', '.join(names)}) in the vocabulary: "
                "name it as hf:PATH@TOKEN"
            )
        self.eod = vocab[found]
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), self.eod + 1)


class GPT2BPETokenizer(_TokenizersBacked):
    """GPT-2 byte-level BPE from local vocab.json and merges.txt, as GPT-2 and Megatron use it.

    "<|endoftext|>" inside a document is ordinary text, as in Megatron's GPT-2 tokenizer; only
    the EOD appended by preprocessing is the special id.
    """

    def __init__(self, vocab_file: str, merges_file: str, spec: str = "") -> None:
        tk = _tokenizers_module()
        for f in (vocab_file, merges_file):
            if not Path(f).is_file():
                raise DataError(f"{f}: not found (gpt2: needs local vocab.json and merges.txt)")
        try:
            vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{vocab_file}: not valid JSON ({e})") from None
        if not isinstance(vocab, dict) or GPT2_EOD not in vocab:
            raise DataError(
                f"{vocab_file}: a GPT-2 vocab.json mapping tokens to ids with {GPT2_EOD}"
            )
        try:
            model = tk.models.BPE.from_file(vocab_file, merges_file)
        except Exception as e:
            raise DataError(
                f"{merges_file}: cannot load BPE merges ({str(e).splitlines()[0]})"
            ) from None
        tok = tk.Tokenizer(model)
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        self._tok = tok
        self.spec = spec or f"gpt2:{vocab_file},{merges_file}"
        self.eod = int(vocab[GPT2_EOD])
        self.vocab_size = max(len(vocab), max(vocab.values()) + 1)


def load_tokenizer(spec: str):
    """The tokenizer named by `spec` (see the module docstring)."""
    if spec == "byte":
        return ByteTokenizer()
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        path, _, eod = rest.partition("@")
        return HFTokenizer(path, eod or None, spec)
    if kind == "gpt2" and rest:
        if "," in rest:
            vocab, merges = rest.split(",", 1)
        else:
            vocab, merges = str(Path(rest) / "vocab.json"), str(Path(rest) / "merges.txt")
        return GPT2BPETokenizer(vocab, merges, spec)
    raise DataError(
        f"tokenizer {spec!r} is unknown: use byte, hf:PATH/tokenizer.json or gpt2:DIR "
        "(with vocab.json and merges.txt)"
    )
