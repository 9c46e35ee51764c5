"""Event delivery: outbox rows to webhooks and NATS JetStream, at least once, ordered per device.

Code that changes something appends an event with
``certfleet.store.outbox.append_event`` in the same transaction (topics in
``names``); a ``DeliveryLoop`` sends it to the sinks made by ``config``.
"""
