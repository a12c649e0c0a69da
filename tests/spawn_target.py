"""A stand-in for `python -m fleetsim pod` in the pod spawner's tests.

``python -m tests.spawn_target OUT MODE [ARG]`` writes what it sees (pid,
session, environment, argv) to OUT as JSON, prints a line, then: ``exit N``
exits with N; ``sleep`` sleeps until killed; ``thread`` leaves a non-daemon
thread that writes OUT.thread when it ends (interpreter exit must join it).
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
out.write_text(json.dumps({"pid": os.getpid(), "sid": os.getsid(0), "argv": sys.argv[1:],
                           "env": os.environ.get("SPAWN_TEST"),
                           "store": os.environ.get("FLEETSIM_STORE")}))
print(f"hello from {os.getpid()}")
if mode == "exit":
    sys.exit(int(sys.argv[3]))
if mode == "sleep":
    time.sleep(120)
if mode == "thread":
    def finish() -> None:
        time.sleep(0.3)
        Path(f"{out}.thread").write_text("joined")

    threading.Thread(target=finish).start()
