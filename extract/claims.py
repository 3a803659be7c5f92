"""Row claims: extract processes that fill one store at once share its rows instead of each doing all
of them (two unsharded extracts, or two of the same shard).

Every process plans the rows that need work from the records it read at planning. Before the encoder
runs on a row, the process claims it: it reads the row's record again and, unless another process
has claimed or written the row since (its generation is already the one this write would give it),
writes a cleared record of that generation (state empty: readers skip the row, as during any
rewrite; step 1 of the crash protocol, done earlier). A row claimed elsewhere is skipped here. The
rows of a batch are claimed together, on a few threads. A race (both processes read the record
before either writes its claim) makes both encode the row: double work, the same result. A process
that dies leaves its claims as empty rows, which the next extract redoes.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from boxrefine.extract.plan import Job
from boxrefine.shared.store.location import StoreError, store_access
from boxrefine.shared.store.row_index import IndexPart
from boxrefine.shared.store.schema import FIELD
from boxrefine.shared.store.split import SplitStore, StoreDamage


class RowClaims:
    """Claims the rows of one split for this process, batch by batch (see the module docstring)."""

    def __init__(self, split: SplitStore, threads: int = 8):
        self.split = split
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="row-claims")
        self.lock = threading.Lock()
        self.elsewhere: list[int] = []  # rows another process claimed or wrote after this one planned

    def take(self, jobs: list[Job]) -> list[bool]:
        """Claim the rows of ``jobs``: True for each row this process now holds, False for a row taken
        by another process since this one planned."""
        return list(self.pool.map(self._claim, jobs))

    def _claim(self, job: Job) -> bool:
        try:
            record = self.split.read_record(job.row)
            taken = int(record[FIELD["generation"]]) >= job.generation
        except StoreDamage:  # an unreadable record: this process rewrites the row
            taken = False
        if taken:
            with self.lock:
                self.elsewhere.append(job.row)
            return False
        with store_access(self.split.store_path, f"write {self.split.name} row {job.row} ({job.path})"):
            self.split.clear_row(job.row, job.generation)
        job.had_record = False  # the claim was the clearing write
        return True

    def close(self, part: IndexPart) -> None:
        """Stop the threads, and take the records of the rows done elsewhere into this process's part of
        the row index (as they are now: the process that finishes last writes them complete)."""
        self.pool.shutdown(wait=True)
        if self.elsewhere:
            rows = np.array(sorted(self.elsewhere), np.int64)
            try:
                records = self.split.read_rows(rows)
            except StoreError:  # the index part then lags for those rows until the next extract plans
                return
            for i in rows.tolist():
                part.set(i, records[i])
