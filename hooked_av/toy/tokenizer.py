"""The toy model's word-level tokenizer: one id per word, special tokens in Omni's roles.

This file is the only place that defines the toy's token ids; everything else asks the tokenizer
(`token_ids()`, `tok.convert_tokens_to_ids`) or the saved config.

    tok = build_tokenizer()
    tok("<|im_start|> user what colour is the shape ?")["input_ids"]
"""

from __future__ import annotations

from hooked_av.toy import vocab

# Omni's special tokens (same strings as the real tokenizer), in a fixed order so the ids are stable.
PAD = "<|endoftext|>"
UNK = "<|unk|>"
SPECIALS = {
    "pad": PAD,
    "unk": UNK,
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "audio": "<|AUDIO|>",
    "audio_bos": "<|audio_bos|>",
    "audio_eos": "<|audio_eos|>",
    "vision_bos": "<|vision_bos|>",
    "vision_eos": "<|vision_eos|>",
    "image": "<|IMAGE|>",
    "video": "<|VIDEO|>",
}
VOCAB_SIZE = 256  # the rest is reserved words, so the embedding matrix has room to grow


def vocabulary() -> list[str]:
    """All tokens in id order: specials, then the prompt and answer words, then reserved fillers."""
    words = list(SPECIALS.values()) + vocab.all_words()
    if len(set(words)) != len(words):
        dup = sorted({w for w in words if words.count(w) > 1})
        raise ValueError(f"the toy vocabulary has duplicate words {dup}")
    if len(words) > VOCAB_SIZE:
        raise ValueError(f"the toy vocabulary has {len(words)} words, more than VOCAB_SIZE={VOCAB_SIZE}")
    return words + [f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - len(words))]


def token_ids() -> dict[str, int]:
    """Role -> id for the special tokens (`"audio"`, `"video"`, `"im_start"`, ..., and `"user"`)."""
    words = vocabulary()
    ids = {role: words.index(tok) for role, tok in SPECIALS.items()}
    ids["user"] = words.index("user")
    return ids


def build_tokenizer():
    """A `PreTrainedTokenizerFast` over `vocabulary()`: whitespace-split words, specials kept whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    core.add_special_tokens(list(SPECIALS.values()))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=SPECIALS["im_end"],
        padding_side="left",  # the answer is read at the last position of every row
        additional_special_tokens=[t for k, t in SPECIALS.items() if k not in ("pad", "unk")],
        model_input_names=["input_ids", "attention_mask"],
    )
