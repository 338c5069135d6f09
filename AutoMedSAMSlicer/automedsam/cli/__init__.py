"""The ``automedsam`` command line (exit codes: 0 ok, 1 internal, 2 bad input/usage, 3 weights/network)."""
