"""What a store holds, by name: the schema version, the row arrays, the fields of a row record and the
row states (docs/architecture.md, "The store"). Every other module of the store imports these."""

from __future__ import annotations

# A version per layout change; readers refuse other versions (the store's changes are listed, for the
# message that names the rebuild command).
# 2: crc32c codec on every array and crc_<array> digests in each row record; GT masks in SAM's exact
# low-res layout; the intensity mapping in the identity. Every array's codecs changed, so no store is
# upgraded in place: `extract --reuse-features OLD` rebuilds one without encoder work (extract/reuse.py).
# 3: a generation in each row record (ROW_FIELDS grew by one: the rows array's chunk shape changed) and
# the row index (shared/store/row_index.py). Rebuilt the same way.
SCHEMA_VERSION = 3
SCHEMA_CHANGES = {2: "checksummed chunks, GT in SAM's exact low-res frame", 3: "row generations, the row index"}

FEATURE_ARRAYS = ("image_embeddings", "interm_embeddings")
GT_ARRAYS = ("gt_masks", "gt_boxes", "gt_info")
ROW_ARRAYS = FEATURE_ARRAYS + GT_ARRAYS
DIGEST = {name: f"crc_{name}" for name in ROW_ARRAYS}  # record field holding the crc32c of a row's values
# ``generation`` counts the writes of a row (every rewrite, clear or mark increments it): a reader that
# finds another generation after reading a row's chunks knows the row was rewritten meanwhile.
ROW_FIELDS = ("state", "src_size", "src_mtime_ns", "ann_hash", "orig_h", "orig_w", "input_h", "input_w",
              "n_instances", *DIGEST.values(), "generation")
FIELD = {name: i for i, name in enumerate(ROW_FIELDS)}  # a row record's column of each field

STATE_EMPTY, STATE_COMPLETE, STATE_BAD, STATE_STALE = 0, 1, 2, 3
STATE_DAMAGED = 4  # marked by `store verify --repair` (or a record failing its checksum); extract redoes it
STATE_NAMES = {STATE_EMPTY: "empty", STATE_COMPLETE: "complete", STATE_BAD: "bad", STATE_STALE: "stale",
               STATE_DAMAGED: "damaged"}
INDEX_CHUNK = 1 << 16  # rows per chunk of the small per-split index arrays (keys, image_ids)
REPAIR = "run `boxrefine store verify --repair {path}`, then `boxrefine extract`"
