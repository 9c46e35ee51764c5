"""Run `certfleet` with uvloop as asyncio's event loop, to measure what that would change.

    python bench/uvloop_launcher.py server --pki ...   (the arguments of `certfleet`)

The policy is set before the server forks, so its workers run uvloop too.
"""

import asyncio

import uvloop

from certfleet.cli.main import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    main()
