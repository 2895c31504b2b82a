"""What agents and the coordinator share: the ring, the frame and message codec,
shared-memory segments, the waiter, the routes table, the counters, the control
protocol and where a bus lives (:mod:`~shmbus.core.paths`).

The only room that touches the C extension (``shmbus._native``): each module
here is the thin typed wrapper of one C area and turns its return codes into
exceptions. Nothing here imports from the rooms above it.
"""
