"""``wardsync`` subcommands beyond the daemon's own: each module exposes ``register(sub)``."""
