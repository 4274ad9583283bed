"""services/common/logs.py: with JSON output, everything a process writes
about itself is a JSON line: structlog's lines, the standard library's logging,
warnings, uncaught exceptions (main thread, threads, "exception ignored") and
asyncio's unhandled task errors. Run in a child process: it sets global hooks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent(
    """
    import asyncio, gc, logging, threading, warnings
    from services.common import logs

    logs.configure("info", "json")
    logs.get_logger("t").info("plain", n=1)
    logging.getLogger("grpc").warning("from stdlib %s", "logging")
    warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)

    def fail():
        raise ValueError("in a thread")

    thread = threading.Thread(target=fail, name="worker")
    thread.start()
    thread.join()

    class Bad:
        def __del__(self):
            raise RuntimeError("in __del__")

    Bad()
    gc.collect()

    async def main():
        asyncio.get_running_loop().set_exception_handler(logs.asyncio_exception_handler)

        async def boom():
            raise KeyError("never awaited")

        task = asyncio.ensure_future(boom())
        await asyncio.sleep(0.01)
        del task
        gc.collect()
        await asyncio.sleep(0.01)

    asyncio.run(main())
    raise SystemError("uncaught at the end")
    """
)


def test_everything_written_is_a_json_line() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # each one JSON
    events = {line["event"]: line for line in lines}

    assert events["plain"]["n"] == 1
    stdlib = events["from stdlib logging"]
    assert (stdlib["level"], stdlib["logger"]) == ("warning", "grpc")
    warned = next(line for line in lines if line.get("logger") == "py.warnings")
    assert "deprecated thing" in warned["event"]
    assert events["thread_exception"]["thread"] == "worker"
    assert "ValueError: in a thread" in events["thread_exception"]["exception"]
    assert "RuntimeError: in __del__" in events["exception_ignored"]["exception"]
    assert "KeyError: 'never awaited'" in events["asyncio_error"]["exception"]
    assert "SystemError: uncaught at the end" in events["uncaught_exception"]["exception"]
    assert all("timestamp" in line and "level" in line for line in lines)
