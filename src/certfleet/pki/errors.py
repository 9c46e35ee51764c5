"""Errors raised by the PKI layer; messages are meant for the operator."""


class PkiError(ValueError):
    """A PKI operation was refused; the message says why and what to do."""
