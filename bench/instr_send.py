"""Instructions per 64 B message (send + receive), counted by callgrind.

A wall-clock benchmark of a 2-process bus on a 2-core machine swings by 2x
from run to run; an instruction count does not depend on load. One agent
sends 64-byte ``bytes`` to its own inbox, 256 at a time, and drains them with
``recv_many(256)``. Run it twice under callgrind and take the difference, so
that start-up cancels out::

    PY=$(python3 -c 'import sys; print(sys.executable)')   # not a pyenv shim
    for n in 5120 15360; do
      valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        $PY bench/instr_send.py $n 2>&1 | grep Collected
    done
    # instructions per message = (second - first) / 10240

The script runs its own coordinator, a child process (which callgrind does
not follow: only the agent is counted) on the bus ``instr-<pid>``. It stops
that coordinator when it ends, the coordinator stops by itself if the script
is killed (``--exit-with-parent``), and a start removes what killed runs
left. With ``$SHMBUS_BUS`` set it uses that bus's coordinator instead.

Point PYTHONPATH at another checkout (its extension built in place) to
compare two trees.
"""

from __future__ import annotations

import os
import subprocess
import sys

import shmbus
from shmbus.core.paths import remove_killed_buses


def _coordinator(bus: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "shmbus", "coordinator", "--bus", bus]
        + ["--exit-with-parent", str(os.getpid()), "--dlq", "memory"]
    )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5120
    bus = os.environ.get("SHMBUS_BUS")
    coordinator = None
    if bus is None:
        remove_killed_buses("instr-")
        bus = f"instr-{os.getpid()}"
        coordinator = _coordinator(bus)
    try:
        agent = shmbus.connect(bus=bus, name=f"instr-{os.getpid()}", timeout=30)
        payload = b"x" * 64
        with agent:
            for _ in range(n // 256):
                for _ in range(256):
                    agent.send(agent.name, payload)
                got = 0
                while got < 256:
                    got += len(agent.recv_many(256, timeout=1))
    finally:
        if coordinator is not None:
            coordinator.terminate()  # SIGTERM: it removes its segments, socket and lock
            coordinator.wait(30)


if __name__ == "__main__":
    main()
