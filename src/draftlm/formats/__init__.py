"""Checkpoint and tokenizer formats: HF folders (`hf`), GGUF files (`gguf`, `gguf_tokenizer`),
SentencePiece models (`sentencepiece`), and the real offline models draftlm knows by
name (`registry`).
"""
