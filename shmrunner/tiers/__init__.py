"""Where the Scheduler's jobs run: the :class:`~shmrunner.tiers.base.Tier`
interface, the local tier (``local.py``: the Pool engine's processes) and the
remote tier (``remote.py``: workers over ZeroMQ). Importing this package
imports neither tier (the remote one needs a socket library)."""
