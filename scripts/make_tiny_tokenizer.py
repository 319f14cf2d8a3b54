#!/usr/bin/env python3
"""Writes tests/fixtures/tiny_tokenizer/: a character-level tokenizer for the 96-id tiny_llama of
../shared/golden (ids: <unk>, <s>, </s>, newline, printable ASCII without ` ~ ^), and a small chat
template, so the services' text routes can be tested on the tiny model."""
import json
import pathlib

out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/tiny_tokenizer"
out.mkdir(parents=True, exist_ok=True)
chars = ["\n"] + [chr(c) for c in range(32, 127) if chr(c) not in "`~^"]
specials = ["<unk>", "<s>", "</s>"]
vocab = {t: i for i, t in enumerate(specials + chars)}
assert len(vocab) == 96
tokenizer = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True} for i, t in enumerate(specials)],
    "normalizer": None, "pre_tokenizer": None, "post_processor": None,
    "decoder": {"type": "Fuse"},
    "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
              "ignore_merges": False, "vocab": vocab, "merges": []},
}
(out / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1, ensure_ascii=False) + "\n")
config = {
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "chat_template": "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                     "{% if add_generation_prompt %}<s>assistant\n{% endif %}",
}
(out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
