"""The batch contract every consumer of packed rows reads (docs/METHOD.md; built by boomerang_jax.data.packing)."""

# Arrays of one batch, each [rows, seq_len] int32: input ids, next-token targets, document (segment) ids,
# positions within each document, and the mask of real next tokens.
BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
