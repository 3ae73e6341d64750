"""Caption tokenizer: a transformers fast tokenizer loaded with from_pretrained, or a small
RoBERTa-style byte-level BPE trained offline on captions (tests, demos, clusters without a hub).

RoBERTa's ids are kept: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4; the text encoder's padding_idx is 1.
"""
from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def load_tokenizer(path_or_name: str):
    """A fast tokenizer from a local directory or a hub name (`from_pretrained`, never a vocab file:
    in transformers 5 some constructors silently ignore `vocab_file`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path_or_name))
    if not tok.is_fast or tok.mask_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"tokenizer {path_or_name}: need a fast tokenizer with mask and pad tokens")
    return tok


def train_tokenizer(captions: list[str], out_dir, vocab_size: int = 1000):
    """Train a byte-level BPE on `captions`, save it to `out_dir`, and return it as loaded from there."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS)
    # <s> caption </s>, as RoBERTa builds its inputs.
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>",
        sep_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def encode(tokenizer, texts: list[str], max_len: int, word_ids: bool = False) -> dict:
    """Captions -> `text_ids`, `attention_mask` [B, max_len] (padded, truncated) and, with `word_ids`,
    each token's word index from the fast tokenizer (-1 for special and padding tokens; MLM's whole words)."""
    enc = tokenizer(texts, max_length=max_len, truncation=True, padding="max_length", return_tensors="pt")
    out = {"text_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    if word_ids:
        words = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(texts))]
        out["word_ids"] = torch.tensor(words, dtype=torch.long)
    return out


def check_tokenizer(tokenizer, text_cfg) -> None:
    """The text encoder's embedding table and padding index must fit the tokenizer."""
    if len(tokenizer) > text_cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but model.text.vocab_size="
                         f"{text_cfg.vocab_size}: raise vocab_size to at least {len(tokenizer)}")
    if tokenizer.pad_token_id != text_cfg.pad_token_id:
        raise ValueError(f"tokenizer pad id {tokenizer.pad_token_id} != model.text.pad_token_id="
                         f"{text_cfg.pad_token_id}")
