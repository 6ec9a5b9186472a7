"""The audit store: zones, controllers and an append-only trail of everything that happened."""

from hvtsm.store.database import Store, default_db_url

__all__ = ["Store", "default_db_url"]
