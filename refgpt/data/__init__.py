"""Tokenizer (Hugging Face ``tokenizers`` byte-level BPE), token files and datasets."""
