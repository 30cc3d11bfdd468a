"""Drives chapeau's QMP socket with QEMU's own Python library (qemu.qmp, from PyPI): connect,
capabilities (done by the library), query-status, query-cpus-fast, stop, cont, and with
`--end quit|powerdown` the end of the VM (waiting for its SHUTDOWN event). Prints one
`key=value` line per step for tests/tests/qemu.rs; any failure raises (exit 1)."""

import argparse
import asyncio

from qemu.qmp import QMPClient


async def main(socket: str, end: str) -> None:
    qmp = QMPClient("chapeau-test")
    await qmp.connect(socket)
    print(f"version={qmp.greeting.QMP.version['qemu']['major']}", flush=True)
    status = await qmp.execute("query-status")
    print(f"status={status['status']}", flush=True)
    for cpu in await qmp.execute("query-cpus-fast"):
        print(f"cpu={cpu['cpu-index']} thread={cpu['thread-id']}", flush=True)
    with qmp.listener() as listener:
        await qmp.execute("stop")
        stopped = await qmp.execute("query-status")
        await qmp.execute("cont")
        continued = await qmp.execute("query-status")
        print(f"stopped={stopped['status']}", flush=True)
        print(f"continued={continued['status']}", flush=True)
        if end != "none":
            await qmp.execute("quit" if end == "quit" else "system_powerdown")
        # Events in the order they came: STOP, RESUME (and POWERDOWN, SHUTDOWN).
        wanted = {"none": "RESUME", "quit": "SHUTDOWN", "powerdown": "SHUTDOWN"}[end]
        async for event in listener:
            print(f"event={event['event']}", flush=True)
            if event["event"] == wanted:
                break
    try:
        await qmp.disconnect()
    except EOFError:
        # After SHUTDOWN the VMM may close the socket before we do, as QEMU does when it exits.
        if end == "none":
            raise
    print("done=yes", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--end", choices=["none", "quit", "powerdown"], default="none")
    args = parser.parse_args()
    asyncio.run(asyncio.wait_for(main(args.socket, args.end), 120))
