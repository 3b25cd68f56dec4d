"""On a TPU VM worker: prefjax.main's jax.distributed flags, from the VM's metadata server.

    python launch/tpu_worker.py [--port 8476]
    # prints, on worker 2 of a 4-host pod, one flag per line:
    #   --config.distributed.coordinator_address=10.0.0.5:8476
    #   --config.distributed.num_processes=4
    #   --config.distributed.process_id=2

Worker 0 is the coordinator. A single-host TPU prints nothing (no jax.distributed needed).
Setting both PREFJAX_TPU_WORKER_NUMBER and PREFJAX_TPU_WORKER_ENDPOINTS replaces the
metadata queries (hosts without a metadata server; the bootstrap's tests).
The bootstrap (launch/bootstrap_tpu.sh) passes these flags explicitly rather than relying
on environment detection, so the process layout is visible in the run's log. Standard
library only: it runs before the environment exists.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request

METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
DEFAULT_PORT = 8476  # jax's own default coordinator port on Cloud TPU


def worker_addresses(endpoints: str) -> list[str]:
    """Host addresses from the `worker-network-endpoints` attribute.

    Two formats exist: a comma-separated list of addresses, or of `name:id:address` triples.
    """
    addresses = []
    for entry in filter(None, (e.strip() for e in endpoints.split(","))):
        parts = entry.split(":")
        if len(parts) == 1:
            addresses.append(parts[0])
        elif len(parts) == 3:
            addresses.append(parts[2])
        else:
            raise ValueError(f"worker-network-endpoints: cannot read entry {entry!r} "
                             "(expected ADDRESS or NAME:ID:ADDRESS)")
    return addresses


def distributed_flags(worker_number: str, endpoints: str, port: int = DEFAULT_PORT) -> list[str]:
    """prefjax.main flags for this worker; [] on a single host."""
    addresses = worker_addresses(endpoints)
    if len(addresses) <= 1:
        return []
    process_id = int(worker_number)
    if not 0 <= process_id < len(addresses):
        raise ValueError(f"agent-worker-number={worker_number} is outside the {len(addresses)} workers")
    return [f"--config.distributed.coordinator_address={addresses[0]}:{port}",
            f"--config.distributed.num_processes={len(addresses)}",
            f"--config.distributed.process_id={process_id}"]


def _metadata(key: str) -> str:
    request = urllib.request.Request(METADATA + key, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print this TPU worker's jax.distributed flags")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    number = os.environ.get("PREFJAX_TPU_WORKER_NUMBER")
    endpoints = os.environ.get("PREFJAX_TPU_WORKER_ENDPOINTS")
    if number is None or endpoints is None:
        number, endpoints = _metadata("agent-worker-number"), _metadata("worker-network-endpoints")
    flags = distributed_flags(number, endpoints, args.port)
    print("\n".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
