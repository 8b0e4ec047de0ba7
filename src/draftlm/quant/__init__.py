"""Quantized linear layers (`layers`: int8, int4, int4-mixed), the 4-bit format they
compute with (`int4`), GGUF's 4-bit blocks read into it (`gguf_int4`), activation
statistics that guide 4-bit rounding (`calibrate`) and draftlm's C++ CPU kernels
(`kernels`, sources in `csrc/`).
"""
