"""shmrunner: run Python functions in worker processes, with numpy arrays in
shared memory locally and over ZeroMQ across hosts."""

from ._segcache import set_shm_cache, shm_cache_info
from .client import Client, connect
from .errors import (
    ChannelClosedError,
    ChannelError,
    ConfigError,
    DependencyError,
    FunctionNotAllowedError,
    InitializerError,
    MemoryLimitError,
    ProtocolError,
    RemoteTaskError,
    SchedulerBusyError,
    SharedMemoryError,
    ShmrunnerError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerLostError,
)
from .pool import Pool
from .scheduler import Scheduler
from .shm import SharedMemoryUnavailableWarning, empty, is_shared, share, zeros

__version__ = "0.1.0"

__all__ = [
    # local tier
    "Pool",
    # local and remote workers
    "Scheduler",
    # the runner daemon's client
    "connect",
    "Client",
    # shared arrays
    "empty",
    "zeros",
    "share",
    "is_shared",
    "set_shm_cache",
    "shm_cache_info",
    # errors and warnings
    "ShmrunnerError",
    "WorkerLostError",
    "MemoryLimitError",
    "TaskTimeoutError",
    "TaskCancelledError",
    "DependencyError",
    "InitializerError",
    "SharedMemoryError",
    "ProtocolError",
    "ChannelError",
    "ChannelClosedError",
    "RemoteTaskError",
    "ConfigError",
    "FunctionNotAllowedError",
    "SchedulerBusyError",
    "SharedMemoryUnavailableWarning",
]
