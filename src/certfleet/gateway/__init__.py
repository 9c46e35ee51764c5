"""The device gateway: the mutual-TLS API devices use for identity, config and update events.

`make_gateway_app(GatewayService(...))` is the aiohttp application; the service
holds the decisions and `identity.py` decides which device a client
certificate is.
"""
