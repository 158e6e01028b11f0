"""
A thousand Doc2X triggers in one event loop, as a triggerer runs them, against the local server.

    python bench/triggerer.py                        # 1000 triggers, 10 s processing, 2 s polls
    python bench/triggerer.py --triggers 200
    AIRFLOW__DOC2X__FREEZE_TRIGGERER_HEAP=False python bench/triggerer.py   # the collector untouched

Prints resident memory per trigger (target: under 50 KB), the worst event-loop lag seen by a
10 ms ticker running beside them (target: under 100 ms), and status requests per job (target: no
more than processing time / poll interval + 2). Triggers share the loop's HTTP client, and the
first one freezes the start-up heap out of garbage collection, as in a triggerer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from pathlib import Path

import psutil
from _support import LocalServer, make_images, report


async def lag_monitor(stop: asyncio.Event, worst: list[float]) -> None:
    tick = 0.01
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(tick)
        worst[0] = max(worst[0], time.perf_counter() - started - tick)


async def run_all(triggers) -> list[dict]:
    stop, worst = asyncio.Event(), [0.0]
    monitor = asyncio.create_task(lag_monitor(stop, worst))

    async def first(trigger):
        async for event in trigger.run():
            return event.payload

    events = await asyncio.gather(*(first(trigger) for trigger in triggers))
    stop.set()
    await monitor
    return events, worst[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--triggers", type=int, default=1000)
    parser.add_argument("--processing", type=float, default=10.0)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    args = parser.parse_args()

    server = LocalServer("--processing-time", str(args.processing), "--rate-limit", "100000")
    server.use_as_default_connection(rate_limit_images=100000, rate_limit_window=1)

    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.triggers.doc2x import Doc2XImageParseTrigger

    # One job per trigger; one tiny image will do: the server makes a job of every upload.
    image = Path(make_images(1)[0]).read_bytes()
    hook = Doc2XHook()
    uids = [hook.submit_image(image, source=f"page-{n}.png") for n in range(args.triggers)]
    submitted = time.monotonic()

    process = psutil.Process()
    gc.collect()
    baseline = process.memory_info().rss
    deadline = time.time() + args.processing * 10 + 60
    triggers = [
        Doc2XImageParseTrigger(
            doc2x_conn_id="doc2x_default",
            jobs=[{"uid": uid, "source": f"page-{n}.png"}],
            poll_interval=args.poll_interval,
            deadline=deadline,
        )
        for n, uid in enumerate(uids)
    ]
    peak = [baseline]
    collections: dict[str, float] = {"worst": 0.0, "started": 0.0}

    def time_collections(phase: str, info: dict) -> None:
        """Time CPython's full collections (generation 2): their pauses stop the loop too."""
        if info["generation"] != 2:
            return
        if phase == "start":
            collections["started"] = time.perf_counter()
        else:
            collections["worst"] = max(collections["worst"], time.perf_counter() - collections["started"])

    gc.callbacks.append(time_collections)

    def sample() -> None:
        peak[0] = max(peak[0], process.memory_info().rss)

    async def measured():
        loop = asyncio.get_running_loop()
        sampler_stop = asyncio.Event()

        async def sampler():
            while not sampler_stop.is_set():
                sample()
                await asyncio.sleep(0.2)

        sampling = loop.create_task(sampler())
        result = await run_all(triggers)
        sampler_stop.set()
        await sampling
        return result

    server_requests_before = server.stats()["requests"].get("status", 0)
    started = time.monotonic()
    events, worst_lag = asyncio.run(measured())
    elapsed = time.monotonic() - started
    stats = server.stats()
    status_requests = stats["requests"].get("status", 0) - server_requests_before
    succeeded = sum(event["status"] == "success" for event in events)
    print(
        f"# triggerer: {args.triggers} triggers in one event loop, processing {args.processing:g} s, "
        f"poll every {args.poll_interval:g} s (jobs submitted {started - submitted:.1f} s before the triggers started)"
    )
    report(
        "figures",
        [
            ("triggers that saw success", f"{succeeded}/{args.triggers}"),
            ("wall seconds until the last event", f"{elapsed:.1f}"),
            ("resident memory per trigger (KB)", f"{(peak[0] - baseline) / args.triggers / 1024:.1f}"),
            ("worst event-loop lag (ms)", f"{worst_lag * 1000:.1f}"),
            ("worst full garbage collection (ms)", f"{collections['worst'] * 1000:.1f}"),
            ("start-up objects frozen out of collections", f"{gc.get_freeze_count()}"),
            ("status requests per job", f"{status_requests / args.triggers:.2f}"),
            ("bound: processing / poll + 2", f"{args.processing / args.poll_interval + 2:.2f}"),
        ],
    )


if __name__ == "__main__":
    main()
