"""Data: documents -> tokenise -> prepared ArrayRecord shards -> grain pipeline (host shard, shuffle, pack, batch).

Modules: documents (where raw text comes from), tokenize (teacher tokenizer, BOS/EOS), prepare (shards),
packing (segment ids, the batch contract), pipeline (DataConfig, make_iterator), batches (evaluation batches),
teacher_text (text sampled from the teacher). Nothing is imported here, so `import boomerang_jax` stays cheap.
"""
