"""Short workflows that compose the library: ingest, plan, train, register, demo (read top to bottom)."""
