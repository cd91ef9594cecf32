"""A CRI ``PullImage`` can take minutes; while the runtime pulls, the agent's event loop keeps
its worker threads (which every ``asyncio.to_thread`` of the agent and the image service
shares): the awaited RPC holds none of them."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.images import cri
from agent.images.containerd.protos import cri_pb2
from tests.images.containerd.conftest import Containerd

pytestmark = pytest.mark.root


async def test_worker_threads_stay_free_while_the_runtime_pulls(
    ctrd: Containerd, fault_proxy: FaultProxy
) -> None:
    image = images.Image([images.random_layer(200_000, files=2, seed=137)])
    images.push(fault_proxy.url, "cri/threads", "1", image)
    blob = f"/blobs/{image.layers[0].digest}"
    rule = fault_proxy.stall(blob, after=1000)
    backend = cri.CriBackend(ctrd.address)
    workers = ThreadPoolExecutor(1)  # the fewest a loop can have
    asyncio.get_running_loop().set_default_executor(workers)
    request = cri_pb2.PullImageRequest(
        image=cri_pb2.ImageSpec(image=f"{fault_proxy.host}/cri/threads:1")
    )
    pulling = asyncio.create_task(backend.client.unary_async(
        "/runtime.v1.ImageService/PullImage", request, cri_pb2.PullImageResponse,
    ))
    try:
        while not any(r.bytes_sent for r in fault_proxy.requests_to(blob, "GET")):
            await asyncio.sleep(0.05)
        # The runtime is stuck in the stalled download; a worker thread is still free.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 30) == "free"
        assert not pulling.done()
    finally:
        pulling.cancel()
        await asyncio.gather(pulling, return_exceptions=True)
        rule.release()
        backend.close()
        workers.shutdown(wait=False)
