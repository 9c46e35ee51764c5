"""Errors raised by the store; messages are meant for the operator."""


class StoreError(ValueError):
    """A store operation was refused; the message says why and what to do."""


class NotFoundError(StoreError):
    """The named row does not exist."""


class DuplicateError(StoreError):
    """A row with the same unique key already exists; nothing was written."""


class TokenRejectedError(StoreError):
    """An API token is unknown, expired or revoked."""
