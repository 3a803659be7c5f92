"""Test helper, run as a process: rewrite rows of a store in a loop through extract's own row writer
(``extract/loader.py`` ``write_row``: clear the record, write the chunks, commit the record with a new
generation), alternating two versions of each row, until ``STOP`` exists or ``SECONDS`` passed.

    python tests/rewrite_rows.py STORE SPLIT STOP SECONDS

Version A is the row as it was; version B has its features negated and only its first instance. Prints
the number of rewrites done."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from boxrefine.extract.loader import write_row
from boxrefine.extract.plan import Job
from boxrefine.shared.data.records import ImageRecord
from boxrefine.shared.store.feature_store import FeatureStore
from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE


def versions(split, i):
    rec = split.read_record(i)
    emb = np.asarray(split.array("image_embeddings")[i])
    interm = np.asarray(split.array("interm_embeddings")[i])
    masks, boxes, info = split.read_gt(i, record=rec)
    a = ((emb, interm), (masks, boxes, info))
    b = ((-emb, -interm), (masks[:1], boxes[:1], info[:1]))
    return rec, a, b


def main(store: str, split_name: str, stop: str, seconds: float) -> None:
    split = FeatureStore.open(store, "a").split(split_name)
    rows = [int(i) for i in np.flatnonzero(split.read_rows()[:, FIELD["state"]] == STATE_COMPLETE)]
    state = {i: versions(split, i) for i in rows}
    t_end, n = time.monotonic() + seconds, 0
    while time.monotonic() < t_end and not Path(stop).exists():
        for i in rows:
            rec, a, b = state[i]
            now = split.read_record(i)
            feats, gt = (b if n // len(rows) % 2 == 0 else a)
            record = ImageRecord(image_id=0, file_name="x", key=0, height=int(rec[FIELD["orig_h"]]),
                                 width=int(rec[FIELD["orig_w"]]), instances=(), ann_hash=int(rec[FIELD["ann_hash"]]))
            job = Job(i, record, Path("x"), gt_only=False, generation=int(now[FIELD["generation"]]) + 1,
                      had_record=True)
            write_row(split, job, (int(rec[FIELD["src_size"]]), int(rec[FIELD["src_mtime_ns"]])), feats, gt)
            n += 1
    print(n, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
