"""Text tokenization for the CLIP text tower, from local tokenizer files only.

``load_tokenizer(path)`` loads a transformers tokenizer saved with ``save_pretrained`` (or a
directory holding CLIP's ``vocab.json`` + ``merges.txt`` / ``tokenizer.json``) without touching
the network; ``tokenize`` pads and truncates a batch of prompts to a fixed context length and
returns numpy int32 arrays ready for ``CLIPTextModelWithProjection``.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import numpy as np

__all__ = ["load_tokenizer", "tokenize", "train_tokenizer"]


def load_tokenizer(path: str) -> Any:
    """Load a tokenizer from a local directory (never downloads).

    Tries ``AutoTokenizer`` (tokenizer_config.json / tokenizer.json) and falls back to
    ``CLIPTokenizer`` for a bare ``vocab.json`` + ``merges.txt`` pair. A tokenizer without a pad
    token gets its eos token as pad token (CLIP's convention).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no tokenizer directory at {path}")
    from transformers import AutoTokenizer, CLIPTokenizer

    def unreadable(e):
        reason = " ".join(str(e).split())[:200]
        return ValueError(f"the tokenizer in {path} cannot be read ({type(e).__name__}: "
                          f"{reason}): its files ({', '.join(sorted(os.listdir(path))) or 'none'})"
                          f" are missing or garbled; save it again (save_pretrained / "
                          f"train_tokenizer)")

    for name in sorted(os.listdir(path)):  # name the file when one is not even JSON
        if name.endswith(".json"):
            try:
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{os.path.join(path, name)} is not valid JSON ({e}): the "
                                 f"tokenizer in {path} is garbled; save it again") from None
    # a tokenizer file is JSON or text; transformers raises many types for a broken one
    errors = (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except errors as e:
        if not (os.path.exists(os.path.join(path, "vocab.json"))
                and os.path.exists(os.path.join(path, "merges.txt"))):
            raise unreadable(e) from None
        try:
            tok = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except errors as e2:
            raise unreadable(e2) from None
    except Exception as e:  # noqa: BLE001 -- the tokenizers library (Rust) raises a bare one
        if type(e) is not Exception and type(e).__module__.split(".")[0] != "tokenizers":
            raise
        raise unreadable(e) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize(tokenizer: Any, prompts: str | Sequence[str],
             context_length: int, *, warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> ``(input_ids [B, L], attention_mask [B, L])``, int32, ``L = context_length``.

    Sequences are padded on the right to ``context_length`` and longer ones are truncated (the
    special tokens, e.g. CLIP's end-of-text token, are kept). If any prompt was truncated, one
    ``UserWarning`` is emitted for the whole call, naming how many prompts were cut
    (``warn=False``: silently, and without the extra tokenizer pass that counts them).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        return (np.zeros((0, context_length), np.int32), np.zeros((0, context_length), np.int32))
    full = tokenizer(prompts, padding=False, truncation=False)["input_ids"] if warn else []
    too_long = [i for i, ids in enumerate(full) if len(ids) > context_length]
    if too_long:
        longest = max(len(full[i]) for i in too_long)
        warnings.warn(
            f"{len(too_long)} of {len(prompts)} prompts are longer than the context length "
            f"{context_length} (longest: {longest} tokens) and were truncated, e.g. "
            f"{prompts[too_long[0]][:80]!r}", UserWarning, stacklevel=2)
    # Right padding always: CLIP pads with its end-of-text token and pools at the first one.
    enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=context_length,
                    padding_side="right", return_tensors="np")
    input_ids = np.asarray(enc["input_ids"], dtype=np.int32)
    mask = np.asarray(enc["attention_mask"], dtype=np.int32)
    if input_ids.shape != (len(prompts), context_length):
        raise ValueError(f"tokenizer returned shape {input_ids.shape}, expected "
                         f"{(len(prompts), context_length)}")
    return input_ids, mask


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_tokenizer(texts: Sequence[str], path: str, *, vocab_size: int = 512,
                    context_length: int = 32) -> Any:
    """Train a byte-level BPE tokenizer (HF tokenizers) on `texts`, save it to `path` as a
    transformers tokenizer (loadable with `load_tokenizer`) and return it.

    Byte-level: any text, including words never seen in training, becomes tokens (no unknowns).
    Lower-cased; <|startoftext|> ... <|endoftext|> around every text; padding with
    <|endoftext|> (CLIP's convention), so the end-of-text id is 1 and pooling takes its first
    position.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("cannot train a tokenizer on no text")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=EOS, model_max_length=context_length)
    fast.save_pretrained(path)
    return fast
