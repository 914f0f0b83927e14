"""Run the real (patched) TGI shard and drive it over gRPC the way TGI's Rust router does: Info,
Warmup, Prefill of each arriving wave of requests, Decode of all cached batches together (the shard
concatenates them), FilterBatch when requests finish, KV blocks and slots allocated by us as the
router's block allocator would. Only the router is replaced; the shard is `text-generation-server
serve`, unmodified apart from our series.

Needs a Python environment where the patched `text_generation_server` imports; on a CPU that is
TGI's Intel path (torch 2.7.0 + intel-extension-for-pytorch 2.7.0, ATTENTION=paged: flashdecoding-ipex
crashes in ipex with any speculation).

    python -m dspark_cli.integrations.tgi.shard SPEC.json OUT.json

SPEC: {"model": dir, "draft": dir|null, "waves": [[arrival_decode_step, [request, ...]], ...],
       "env": {...}, "speculate": --speculate or absent} with request = {"id", "prompt": [ids], "max_new_tokens", "temperature",
       "do_sample", "seed", "top_k", "top_p", "repetition_penalty", "regex"}.
OUT: {"speculate": Info.speculate, "device_type": Info.device_type, "tokens": {id: [generated ids]}, "finish": {id: reason},
      "rounds": {id: generate_token calls that emitted its tokens}, "steps": decode calls, "log": the shard's log}
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dspark_cli.integrations.spec_runner import serve_spec

ATTENTION = "paged"


class Router:
    """The part of TGI's v3 router the shard needs: batch ids, block allocation, the decode loop."""

    def __init__(self, stub, pb, speculate: int, block_size: int):
        self.stub, self.pb, self.speculate, self.block_size = stub, pb, speculate, block_size
        self.next_block = 1  # never reused: tests are small
        self.batch_ids = 0
        self.tokens: dict[int, list[int]] = {}
        self.rounds: dict[int, int] = {}  # generate_token calls that emitted tokens for the request
        self.finish: dict[int, str] = {}

    def _request(self, r: dict):
        from dspark_cli.integrations.tgi.fixtures import text

        pb = self.pb
        tokens = len(r["prompt"]) + r["max_new_tokens"] + self.speculate
        bs = self.block_size
        blocks = list(range(self.next_block, self.next_block + math.ceil(tokens / bs)))
        self.next_block += len(blocks)
        slots = [s for b in blocks for s in range(b * bs, (b + 1) * bs)]
        words = text(r["prompt"])
        return pb.Request(
            id=r["id"], inputs=words, input_chunks=pb.Input(chunks=[pb.InputChunk(text=words)]),
            truncate=len(r["prompt"]), blocks=blocks, slots=slots, add_special_tokens=False,
            parameters=pb.NextTokenChooserParameters(
                temperature=r.get("temperature", 1.0), top_k=r.get("top_k", 0), top_p=r.get("top_p", 1.0),
                typical_p=1.0, do_sample=r.get("do_sample", False), seed=r.get("seed", 0),
                repetition_penalty=r.get("repetition_penalty", 1.0), frequency_penalty=0.0,
                grammar=r.get("regex", ""), grammar_type=pb.GRAMMAR_TYPE_REGEX if r.get("regex") else pb.GRAMMAR_TYPE_NONE),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=r["max_new_tokens"],
                                                              ignore_eos_token=True))

    def _batch(self, requests: list[dict]):
        self.batch_ids += 1
        reqs = [self._request(r) for r in requests]
        return self.pb.Batch(id=self.batch_ids, requests=reqs, size=len(reqs),
                             max_tokens=sum(len(r.slots) for r in reqs), max_blocks=max(len(r.blocks) for r in reqs))

    def _collect(self, generations) -> None:
        for g in generations:
            self.tokens.setdefault(g.request_id, []).extend(g.tokens.ids)
            self.rounds[g.request_id] = self.rounds.get(g.request_id, 0) + 1
            if g.HasField("generated_text"):
                self.finish[g.request_id] = self.pb.FinishReason.Name(g.generated_text.finish_reason)

    def _keep_live(self, cached):
        """FilterBatch with the unfinished requests, or drop the batch when none is left."""
        if cached is None:
            return None
        live = [i for i in self._ids[cached.id] if i not in self.finish]
        if not live:
            self.stub.ClearCache(self.pb.ClearCacheRequest(id=cached.id))
            return None
        if len(live) < len(self._ids[cached.id]):
            cached = self.stub.FilterBatch(self.pb.FilterBatchRequest(batch_id=cached.id, request_ids=live)).batch
            self._ids[cached.id] = live
        return cached

    def run(self, waves: list) -> int:
        self._ids: dict[int, list[int]] = {}
        waves = sorted(waves, key=lambda w: w[0])
        cached, step = [], 0
        while waves or cached:
            if waves and (waves[0][0] <= step or not cached):
                _, requests = waves.pop(0)
                batch = self._batch(requests)
                resp = self.stub.Prefill(self.pb.PrefillRequest(batch=batch))
                self._collect(resp.generations)
                if resp.HasField("batch"):
                    self._ids[resp.batch.id] = [r["id"] for r in requests]
                    new = self._keep_live(resp.batch)
                    cached += [new] if new is not None else []
                continue
            resp = self.stub.Decode(self.pb.DecodeRequest(batches=cached))
            self._collect(resp.generations)
            ids = [i for b in cached for i in self._ids[b.id]]
            cached = []
            if resp.HasField("batch"):
                self._ids[resp.batch.id] = ids
                new = self._keep_live(resp.batch)
                cached = [new] if new is not None else []
            step += 1
        return step


def serve_and_drive(spec: dict) -> dict:
    from text_generation_server.pb import generate_pb2 as pb
    from text_generation_server.pb import generate_pb2_grpc
    import grpc

    env = {**os.environ, "PREFIX_CACHING": "0", "USE_PREFIX_CACHING": "0", **spec.get("env", {})}
    env.setdefault("ATTENTION", ATTENTION)  # the launcher's choice when it is set
    env.pop("DSPARK_DRAFT", None)
    if spec.get("draft"):
        env["DSPARK_DRAFT"] = spec["draft"]
    with tempfile.TemporaryDirectory() as tmp:
        uds = Path(tmp) / "shard"
        log = open(Path(tmp) / "shard.log", "w+")
        server = subprocess.Popen([sys.executable, "-m", "text_generation_server.cli", "serve", spec["model"],
                                   "--uds-path", str(uds)]  # dtype: TGI's CPU default, bfloat16
                                  + (["--speculate", str(spec["speculate"])] if spec.get("speculate") is not None else []),
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            socket = Path(f"{uds}-0")
            deadline = time.time() + 300
            while not socket.exists():
                if server.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"TGI shard did not start:\n{log.read()[-4000:]}")
                time.sleep(0.5)
            channel = grpc.insecure_channel(f"unix://{socket}")
            stub = generate_pb2_grpc.TextGenerationServiceStub(channel)
            info = stub.Info(pb.InfoRequest())
            router = Router(stub, pb, info.speculate, info.block_size)
            # As TGI's router: several warmup requests (max_prefill_tokens / max_input_tokens of
            # them), all id 0.
            warm = router._batch([{"id": 0, "prompt": [1, 2, 3, 4], "max_new_tokens": 8},
                                  {"id": 0, "prompt": [5, 6, 7], "max_new_tokens": 8}])
            for r in warm.requests:  # warmup batches carry no blocks: the shard lays them out itself
                del r.blocks[:]
                del r.slots[:]
            stub.Warmup(pb.WarmupRequest(batch=warm, max_input_tokens=64, max_prefill_tokens=4096,
                                         max_total_tokens=512))
            router.next_block = 1
            steps = router.run(spec["waves"])
            log.seek(0)
            return {"speculate": info.speculate, "device_type": info.device_type, "log": log.read(),
                    "tokens": {str(k): v for k, v in router.tokens.items()},
                    "finish": {str(k): v for k, v in router.finish.items()},
                    "rounds": {str(k): v for k, v in router.rounds.items()}, "steps": steps}
        except grpc.RpcError as e:
            log.seek(0)
            server.poll()
            raise RuntimeError(f"TGI shard failed: {e.details()} (shard exit code {server.returncode})\n"
                               f"{log.read()[-6000:]}") from None
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    serve_spec(serve_and_drive)
