"""Data: sources -> tokenise (prepare-data, ArrayRecord shards) -> grain pipeline (host shard, shuffle, pack, batch).

Modules: sources (documents), tokenize (teacher tokenizer, BOS/EOS), prepare (shards + `boomerang prepare-data`),
packing (segment ids, batch contract, check_batch), pipeline (DataConfig, make_iterator).
Nothing is imported here, so `import boomerang_jax` stays cheap.
"""
