"""One module per ``neuroadda-rt`` subcommand, each with ``register(subparsers)``."""
