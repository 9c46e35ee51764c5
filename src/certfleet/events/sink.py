"""What the delivery loop needs from a destination (webhook, NATS)."""

from __future__ import annotations

from typing import Protocol

from certfleet.events.names import Envelope


class DeliveryError(Exception):
    """A sink did not accept an event; the message is safe to log (no secrets)."""


class Sink(Protocol):
    """A destination that accepts envelopes; ``send`` raises DeliveryError on refusal."""

    name: str

    async def send(self, envelope: Envelope) -> None:
        """Deliver one envelope, or raise DeliveryError."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
