"""Instructions per 64 B message (send + receive), counted by callgrind.

A wall-clock benchmark of a 2-process bus on a 2-core machine swings by 2x
from run to run; an instruction count does not depend on load. One agent
sends 64-byte ``bytes`` to its own inbox, 256 at a time, and drains them with
``recv_many(256)``. Run it twice under callgrind and take the difference, so
that start-up cancels out::

    shmbus coordinator --bus cgbus &
    PY=$(python3 -c 'import sys; print(sys.executable)')   # not a pyenv shim
    for n in 5120 15360; do
      SHMBUS_BUS=cgbus valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        $PY bench/instr_send.py $n 2>&1 | grep Collected
    done
    # instructions per message = (second - first) / 10240

Point PYTHONPATH at another checkout (its extension built in place) to
compare two trees.
"""

from __future__ import annotations

import os
import sys

import shmbus


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5120
    agent = shmbus.connect(name=f"instr-{os.getpid()}")  # bus from $SHMBUS_BUS
    payload = b"x" * 64
    with agent:
        for _ in range(n // 256):
            for _ in range(256):
                agent.send(agent.name, payload)
            got = 0
            while got < 256:
                got += len(agent.recv_many(256, timeout=1))


if __name__ == "__main__":
    main()
