"""API keys with budgets and the usage ledger (`keys:` in the gateway config): `store` is the database,
`accounting` the per-process cache, admission and batched ledger writer, `cli` the `slm-fusion keys` commands."""

from slm_fusion.keys.accounting import KeyAccounting
from slm_fusion.keys.store import PERIODS, KeyRecord, KeyStore, UsageRow, open_store

__all__ = ["PERIODS", "KeyAccounting", "KeyRecord", "KeyStore", "UsageRow", "open_store"]
