"""`draftlm bench`: plain decoding against speculative configurations on the same prompts
(`command`), rows and their summaries (`records`), and peers measured beside them:
HF transformers and llama.cpp (`baselines`).
"""
