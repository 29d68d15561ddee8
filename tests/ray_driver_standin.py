"""The head's engine of a Ray replica in the tests, in vLLM's place (whose CPU build refuses Ray):
a Ray driver that joins the replica's cluster the way vLLM's Ray executor does (``ray.init`` with
``RAY_ADDRESS``), places one actor on every node (a STRICT_SPREAD placement group, as vLLM places
its ranks), says where they run, then serves as the stand-in while holding them.

    python -m tests.ray_driver_standin NNODES [stand-in flags]
"""

from __future__ import annotations

import runpy
import sys

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@ray.remote(num_cpus=1)
class Rank:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def main() -> None:
    nnodes, standin_args = int(sys.argv[1]), sys.argv[2:]
    ray.init(logging_level="ERROR")  # RAY_ADDRESS: the replica's cluster, never a new one
    alive = [n for n in ray.nodes() if n["Alive"]]
    print(f"ray nodes alive at engine start: {len(alive)}", flush=True)
    group = placement_group([{"CPU": 1}] * nnodes, strategy="STRICT_SPREAD")
    ray.get(group.ready(), timeout=60)
    ranks = [Rank.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
             for i in range(nnodes)]
    nodes = ray.get([r.node.remote() for r in ranks], timeout=60)
    print(f"ranks placed on {len(set(nodes))} distinct nodes", flush=True)
    sys.argv = ["standin", *standin_args]
    runpy.run_module("server.standin", run_name="__main__")


if __name__ == "__main__":
    main()
