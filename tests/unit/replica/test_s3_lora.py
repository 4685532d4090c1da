"""GeneratorReplica with an s3:// LoRA (moto's S3 server, the small model): its one download point fetches it,
and the adapter it loads is that very file (the image equals the one drawn with the same file from the root)."""

from __future__ import annotations

import asyncio

from serve_app.config import BatchSettings, LoraArgs
from serve_app.engine.reference import FluxEngine
from serve_app.loras.sources import LoraSources
from serve_app.replica.core import GeneratorReplica
from serve_app.workitems import ItemResult, LoraUse, WorkItem
from tests.support.s3 import REGION
from tests.unit.replica.test_core import item

BUCKET = "flux-replica-loras"


def test_an_s3_lora_is_prefetched_and_used(tiny_dir, lora_root, tmp_path, s3):
    import s3fs

    fs = s3fs.S3FileSystem(**s3.options)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET, region_name=REGION)
    fs.pipe_file(f"{BUCKET}/styles/style.safetensors", (lora_root / "aitk" / "style.safetensors").read_bytes())
    sources = LoraSources(LoraArgs(root=str(lora_root), cache_dir=str(tmp_path / "cache"), allowed_buckets=[BUCKET],
                                   s3_options=s3.options))
    replica = GeneratorReplica(FluxEngine.load(str(tiny_dir), device="cpu"), sources, BatchSettings(), max_lora_sets=2)
    from_s3 = item("s3", loras=(LoraUse(sources.canonical(f"s3://{BUCKET}/styles/style.safetensors"), 0.8),))
    from_root = item("root", loras=(LoraUse("aitk/style.safetensors", 0.8),))

    async def one(work: WorkItem):
        return (await replica.run_batch([work]))[0]

    async def go():
        try:
            return [await replica.generate(work, None, one) for work in (from_s3, from_root)], len(replica.held)
        finally:
            replica.close()

    (s3_result, root_result), still_held = asyncio.run(go())
    assert isinstance(s3_result, ItemResult) and isinstance(root_result, ItemResult), (s3_result, root_result)
    assert s3_result.lora_modules[0][0] == f"s3://{BUCKET}/styles/style.safetensors"
    assert s3_result.lora_modules[0][1] > 0 and s3_result.lora_modules[0][1] == root_result.lora_modules[0][1]
    assert s3_result.data == root_result.data  # the same LoRA bytes, so the same pixels
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1 and still_held == 0
