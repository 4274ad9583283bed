"""`python -m tools.launch services.<name> [args]`: runs a service module, but
first asks the kernel to send it SIGTERM when the process that started it dies
(even by SIGKILL), so that `make run` never leaves a service behind.

Done here, after exec, rather than in a `preexec_fn`: running Python between
fork and exec is unsafe in a parent with threads (gRPC's), and crashed once."""

from __future__ import annotations

import ctypes
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
