"""Guards: what a call must pass before any token is spent."""
