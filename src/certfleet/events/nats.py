"""NATS JetStream sink: publish each envelope to ``<prefix>.<topic>``.

The ``Nats-Msg-Id`` header carries the event id, so JetStream drops a
redelivered event that arrives within the stream's duplicate window. The
stream is created on first use if it does not exist.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from certfleet.events.names import Envelope
from certfleet.events.sink import DeliveryError
from certfleet.events.webhook import display_url

log = logging.getLogger(__name__)


class NatsSink:
    """Publishes envelopes to one JetStream stream."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        subject_prefix: str = "certfleet",
        stream: str = "CERTFLEET",
        duplicate_window: float = 3600.0,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.name = f"nats {display_url(url)} stream {stream}"
        self.subject_prefix = subject_prefix
        self.stream = stream
        self.duplicate_window = duplicate_window
        self.timeout = timeout
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        # The loop sends for several devices at once; they must share one connection.
        self._connecting = asyncio.Lock()

    def __repr__(self) -> str:
        return f"NatsSink({display_url(self.url)!r}, stream={self.stream!r})"

    def subject(self, topic: str) -> str:
        """The subject an event of ``topic`` is published on."""
        return f"{self.subject_prefix}.{topic}"

    async def send(self, envelope: Envelope) -> None:
        """Publish and wait for the stream's acknowledgement."""
        try:
            js = await self._jetstream()
            ack = await js.publish(
                self.subject(envelope.topic),
                envelope.body(),
                timeout=self.timeout,
                stream=self.stream,
                headers={"Nats-Msg-Id": envelope.id},
            )
        except (NatsError, OSError, TimeoutError) as exc:
            raise DeliveryError(f"NATS: {type(exc).__name__} {exc}".strip()) from None
        if ack.duplicate:
            log.debug("event %s was already in stream %s", envelope.id, self.stream)

    async def close(self) -> None:
        """Close the connection."""
        client, self._client, self._js = self._client, None, None
        if client is not None:
            await client.close()

    async def _jetstream(self) -> JetStreamContext:
        async with self._connecting:
            if self._js is None or self._client is None or self._client.is_closed:
                await self.close()
                client = await self._connect()
                js = client.jetstream(timeout=self.timeout)
                try:
                    await self._ensure_stream(js)
                except BaseException:
                    await client.close()
                    raise
                self._client, self._js = client, js
            return self._js

    async def _connect(self) -> Client:
        client = Client()
        try:
            # nats-py retries a refused first connection forever; bound it so the
            # event gets its own backoff. Once connected it reconnects by itself.
            async with asyncio.timeout(self.timeout):
                await client.connect(
                    self.url,
                    connect_timeout=self.timeout,
                    max_reconnect_attempts=-1,
                    error_cb=_quiet,
                )
        except BaseException:
            await client.close()
            raise
        return client

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            await js.stream_info(self.stream)
            return
        except NotFoundError:
            pass
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.subject_prefix}.>"],
            duplicate_window=self.duplicate_window,
        )
        # Adding a stream with the same settings is a no-op, so racing workers agree.
        await js.add_stream(config)
        log.info("created JetStream stream %s for %s.>", self.stream, self.subject_prefix)


async def _quiet(exc: Exception) -> None:
    # nats-py reports every reconnect attempt; the delivery loop logs failures once.
    log.debug("nats: %s", exc)
