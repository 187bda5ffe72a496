"""The worker side: its lifecycle (spawn, reap, respawn) and its task loop."""
