"""Database fixtures (filled in with the store)."""
