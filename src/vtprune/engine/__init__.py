"""The machinery every method shares: per-generation state, layouts and KV surgery, partial
attention scoring, the ledger, and attaching / detaching a run."""
