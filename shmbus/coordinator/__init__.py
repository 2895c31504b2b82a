"""The control plane of one bus: registry, takeover, the bridge for uds agents,
the dead-letter queue and history. Started as ``shmbus coordinator --bus NAME``
(or by :class:`shmbus.Runner`); never imported by an agent.
"""

from .coordinator import Coordinator

__all__ = ["Coordinator"]
