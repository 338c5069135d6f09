"""The local inference worker: a FastAPI service with the engine's API (see ``service.app``).

Protocol version ``PROTOCOL`` changes whenever a request or response changes incompatibly; the
client refuses to talk to a server of another protocol and says what to upgrade.
"""

PROTOCOL = "1"
