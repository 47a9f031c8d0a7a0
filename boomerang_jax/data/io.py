"""The data pipeline's file operations: the project-wide path abstraction `boomerang_jax.storage`.

Reading ArrayRecord shards needs no help (array_record opens `gs://` itself); writing them does not work
on `gs://` (ArrayRecordWriter fails there), so writers use `staged_dir`: write locally, then upload.
"""

from boomerang_jax.storage import (  # noqa: F401  (re-exported for the data modules)
    PathLike, exists, glob, has_glob, is_dir, is_remote, join, makedirs, name, open_binary, read_text, remove,
    staged_dir, walk_files, write_text_atomic,
)
