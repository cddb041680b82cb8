"""The webserver's side of the synthetic year (benchmarks/year_bench.py): `make ui`'s command, `dg dev` (the
webserver and the daemon, whose sensors and automation tick over the year's instance meanwhile), started over the
bench's instance with the same workspace.yaml, then the GraphQL queries behind the pages, timed over HTTP as the
browser sends them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lora_pipeline.core.paths import REPO_ROOT

ASSET_GRAPH = """query { assetNodes { id assetKey { path } dependencyKeys { path } groupName isPartitioned
  partitionDefinition { description } } }"""
PARTITION_STATUS = """query { assetNodeOrError(assetKey: {path: ["%s"]}) { ... on AssetNode {
  partitionKeysByDimension { partitionKeys }
  assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions
  materializingPartitions } } } } }"""
PARTITION_EVENTS = """query { assetOrError(assetKey: {path: ["%s"]}) { ... on Asset {
  assetMaterializations(partitions: ["%s"], limit: 1) { timestamp partition metadataEntries { label } } } } }"""
RUN_LIST = """query { runsOrError(limit: 25) { ... on Runs { results { runId status jobName
  tags { key value } } } } }"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str, timeout: float = 300) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = json.loads(response.read())
    if data.get("errors"):
        raise RuntimeError(f"GraphQL errors: {data['errors']}")
    return data["data"]


def timed_query(port: int, query: str, runs: int = 3) -> float:
    """The best of `runs` answers, in seconds."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        graphql(port, query)
        best = min(best, time.perf_counter() - started)
    return best


def measure_ui(env: dict[str, str], workdir: Path, partitions: dict[str, str]) -> dict[str, float]:
    """Seconds to a usable asset graph after start, and each page's query; `partitions`: {asset: one key}."""
    port = _free_port()
    log = open(workdir / "webserver.log", "w")  # noqa: SIM115 (closed below)
    bin_dir = Path(sys.executable).parent
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(bin_dir / "dg"), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO_ROOT / "workspace.yaml")],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=env["DAGSTER_HOME"], start_new_session=True)
    out: dict[str, float] = {}
    try:
        while True:
            try:
                nodes = graphql(port, ASSET_GRAPH, timeout=60)["assetNodes"]
                if nodes:
                    break
            except (OSError, RuntimeError):
                pass
            if process.poll() is not None or time.perf_counter() - started > 300:
                raise RuntimeError(f"webserver did not answer; see {workdir / 'webserver.log'}")
            time.sleep(0.1)
        out["ui: make ui (dg dev, daemon included): start to a usable asset graph"] = time.perf_counter() - started
        out["ui: asset graph query"] = timed_query(port, ASSET_GRAPH)
        for asset, key in partitions.items():
            out[f"ui: {asset} partitions page (status of all)"] = timed_query(port, PARTITION_STATUS % asset)
            out[f"ui: {asset} one partition's materialization"] = timed_query(port, PARTITION_EVENTS % (asset, key))
        out["ui: run list (25 runs)"] = timed_query(port, RUN_LIST)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
    return out
