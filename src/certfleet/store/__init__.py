"""The certfleet store: schema, migrations and queries; the only code that writes SQL.

Open a store with ``open_store(url)``, then run the query functions of the
modules here (``factories``, ``cas``, ``devices``, ...) on the session of
``async with store.transaction() as tx:``. The few queries every device
request makes have a faster path without the ORM: ``store.hot_path()``.
"""

from certfleet.store.engine import Store, open_store
from certfleet.store.errors import DuplicateError, NotFoundError, StoreError, TokenRejectedError
from certfleet.store.migrate import current_revision, head_revision, upgrade

__all__ = [
    "DuplicateError",
    "NotFoundError",
    "Store",
    "StoreError",
    "TokenRejectedError",
    "current_revision",
    "head_revision",
    "open_store",
    "upgrade",
]
