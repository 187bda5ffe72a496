"""How bytes move between processes: fd-carrying channels and array-aware pickling."""
