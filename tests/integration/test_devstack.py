"""The private stack of `make run`/`make test`: starts, serves, stops, leaves nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import asyncpg
import nats
import pytest

from tools.devstack import DevStack, pid_alive

# About a second each when idle; far more beside a benchmark on 2 cores.
pytestmark = pytest.mark.timeout(300)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in command and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid and pid_alive(int(entry.name)):
            children.append(int(entry.name))
    return children


async def test_devstack_serves_postgres_and_jetstream_and_stops(tmp_path: Path) -> None:
    base = tmp_path / "stack"
    stack = DevStack(base)
    began = time.monotonic()
    try:
        database_url, nats_url = await stack.astart()
        postgres_pid, nats_pid = stack.postgres_pid, stack.nats_pid
        assert postgres_pid is not None and nats_pid is not None
        assert pid_alive(postgres_pid) and pid_alive(nats_pid)
        assert database_url.startswith("postgresql://postgres@127.0.0.1:")
        assert database_url.endswith("/usagebilling")
        # The all-permission user's URL (anonymous clients are refused).
        assert nats_url.startswith("nats://tools:") and "@127.0.0.1:" in nats_url
        assert (base / "pg" / "data" / "PG_VERSION").is_file()

        connection = await asyncpg.connect(database_url)
        try:
            assert await connection.fetchval("select 1") == 1
            assert await connection.fetchval("show fsync") == "on"
        finally:
            await connection.close()

        client = await nats.connect(nats_url)
        try:
            js = client.jetstream()
            await js.add_stream(name="DEVSTACK_TEST", subjects=["devstack.test"])
            ack = await js.publish("devstack.test", b"hello")
            assert ack.stream == "DEVSTACK_TEST"
            await js.delete_stream("DEVSTACK_TEST")
        finally:
            await client.close()
    finally:
        await stack.astop()
    await stack.astop()  # idempotent

    assert not pid_alive(postgres_pid)
    assert not pid_alive(nats_pid)
    assert _children_of(postgres_pid) == []
    assert _processes_mentioning(str(base)) == []
    # Not a timing test: only that stopping does not hang (initdb alone took
    # 24 s on a loaded 2-core machine).
    assert time.monotonic() - began < 240


async def test_devstack_reuses_its_data_and_stops_a_leftover_server(tmp_path: Path) -> None:
    base = tmp_path / "stack"
    script = (
        "import sys, time\n"
        "from tools.devstack import DevStack\n"
        "stack = DevStack(sys.argv[1])\n"
        "print(*stack.start(), stack.postgres_pid, stack.nats_pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    # A run that gets killed (SIGKILL): its servers keep running.
    killed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(base),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert killed.stdout is not None
        line = await asyncio.wait_for(killed.stdout.readline(), 180)
        database_url, _, postgres_pid, nats_pid = line.decode().split()
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute("create table kept (id int primary key)")
            await connection.execute("insert into kept values (42)")
        finally:
            await connection.close()
    finally:
        killed.kill()
        await killed.wait()
    try:
        assert pid_alive(int(postgres_pid)) and pid_alive(int(nats_pid))

        async with DevStack(base) as (database_url, _):
            assert not pid_alive(int(postgres_pid))
            assert not pid_alive(int(nats_pid))
            connection = await asyncpg.connect(database_url)
            try:
                assert await connection.fetchval("select id from kept") == 42
            finally:
                await connection.close()
        assert _processes_mentioning(str(base)) == []
    finally:
        # Should this test fail half-way, leave no server behind.
        await asyncio.to_thread(DevStack(base).stop_leftovers)


async def test_a_killed_server_is_seen_and_started_again_on_its_port(tmp_path: Path) -> None:
    """What `make run` does when the private PostgreSQL or NATS dies."""
    stack = DevStack(tmp_path / "stack")
    try:
        database_url, nats_url = await stack.astart()
        assert stack.dead_servers() == []
        nats_pid, postgres_pid = stack.nats_pid, stack.postgres_pid
        assert nats_pid is not None and postgres_pid is not None
        os.kill(nats_pid, signal.SIGKILL)
        os.kill(postgres_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while sorted(stack.dead_servers()) != ["NATS", "PostgreSQL"]:
            assert time.monotonic() < deadline, stack.dead_servers()
            await asyncio.sleep(0.1)

        await asyncio.to_thread(stack.restart_nats)
        await asyncio.to_thread(stack.restart_postgres)
        assert stack.dead_servers() == []
        assert stack.nats_pid != nats_pid and stack.postgres_pid != postgres_pid
        # The same URLs (the same ports): clients reconnect.
        connection = await asyncpg.connect(database_url)
        try:
            assert await connection.fetchval("select 1") == 1
        finally:
            await connection.close()
        client = await nats.connect(nats_url)
        try:
            await client.jetstream().account_info()
        finally:
            await client.close()
    finally:
        await stack.astop()
    assert _processes_mentioning(str(tmp_path / "stack")) == []
