"""``python -m automedsam ...`` runs the command line (used to start a worker with Slicer's Python)."""

from .cli.main import main

main()
