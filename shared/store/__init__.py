"""The feature store: a self-describing, crash-safe Zarr v3 group of per-image HQ-SAM features and
ground truth (docs/architecture.md, "The store"). Its public names, for the stages and for users::

    from boxrefine.shared.store import open_store, StoreRows

The modules: ``schema`` (version, arrays, row fields and states), ``identity`` (what decides the
values; the feature-compatibility rule), ``feature_store`` (open / create / check a store),
``layout`` (a split's arrays), ``split`` (one split: the row protocol, checked reads), ``direct`` (a
row's chunks read without zarr's per-call cost), ``row_index`` (the consolidated records), ``rows``
(the torch Dataset over a split), ``codecs`` (storage dtype, compression, digests), ``location``
(paths and URLs, one-line errors), ``objstore`` (S3 through obstore), ``bad_images`` (what extract
could not read), ``verify`` (``store verify``), ``watchers`` (``extract --watch`` heartbeats).
"""

from boxrefine.shared.store.feature_store import FeatureStore, open_checked_store, open_store
from boxrefine.shared.store.identity import FEATURE_FIELDS, StoreIdentity, feature_differences, identity_for
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.rows import StoreRows, collate_rows
from boxrefine.shared.store.schema import SCHEMA_VERSION
from boxrefine.shared.store.split import RowBusy, SplitStore, StoreDamage

__all__ = ["FEATURE_FIELDS", "SCHEMA_VERSION", "FeatureStore", "RowBusy", "SplitStore", "StoreDamage", "StoreError",
           "StoreIdentity", "StoreRows", "collate_rows", "feature_differences", "identity_for", "open_checked_store",
           "open_store"]
