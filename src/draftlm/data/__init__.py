"""Training data: source files to documents (`sources`), documents to packed uint16
shards (`pack`, `prepare`: the `draftlm prepare` command), shards to batches with an
exact-resume state (`loader`), and BPE tokenizer training (`tokenizer_train`).
"""
