"""The local inference worker: a FastAPI service with the engine's API (:mod:`.app`), speaking the
wire protocol of :mod:`.protocol` (shared with :mod:`automedsam.client`)."""
