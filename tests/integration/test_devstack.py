"""The private stack of `make run`/`make test`: starts, serves, stops, leaves nothing."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import asyncpg
import nats
import pytest

from tools.devstack import DevStack, pid_alive

pytestmark = pytest.mark.timeout(60)  # it takes about a second


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
    assert time.monotonic() - began < 20


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
        line = await asyncio.wait_for(killed.stdout.readline(), 30)
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
