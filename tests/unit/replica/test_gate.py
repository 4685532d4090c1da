"""BatchGate without Ray: arrivals during a batch pass together, grouped by key, in arrival order."""

from __future__ import annotations

import asyncio

from serve_app.replica.gate import BatchGate


def test_an_idle_gate_lets_an_item_pass_at_once():
    async def main():
        gate = BatchGate()
        await asyncio.wait_for(gate.enter("a"), timeout=1)
        assert gate.waiting == 0

    asyncio.run(main())


def test_arrivals_during_a_batch_wait_and_pass_as_one_wave_grouped_by_key():
    async def main():
        gate = BatchGate()
        queue: list[tuple[str, int]] = []

        async def arrive(key, n):
            await gate.enter(key)
            queue.append((key, n))  # what Serve's batch queue would receive, in order

        gate.batch_started()
        tasks = [asyncio.create_task(arrive(key, n)) for n, key in enumerate("abacb")]
        await asyncio.sleep(0.01)
        assert queue == [] and gate.waiting == 5
        gate.batch_finished()
        await asyncio.gather(*tasks)
        assert queue == [("a", 0), ("a", 2), ("b", 1), ("b", 4), ("c", 3)]
        assert gate.waves == 1 and gate.waiting == 0

    asyncio.run(main())


def test_the_wave_waits_for_every_running_batch():
    async def main():
        gate = BatchGate()
        gate.batch_started()
        gate.batch_started()  # Serve runs sub-batches of different LoRA sets concurrently
        waiter = asyncio.create_task(gate.enter("a"))
        gate.batch_finished()
        await asyncio.sleep(0.01)
        assert not waiter.done()
        gate.batch_finished()
        await asyncio.wait_for(waiter, timeout=1)

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_no_trace():
    async def main():
        gate = BatchGate()
        gate.batch_started()
        waiter = asyncio.create_task(gate.enter("a"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert gate.waiting == 0
        gate.batch_finished()
        assert gate.waves == 0
        await asyncio.wait_for(gate.enter("b"), timeout=1)

    asyncio.run(main())
