"""A Ray cluster of three real nodes on this machine, in a process of its own (`ray.cluster_utils.Cluster`),
for the multi-node tests and for trying the cluster path by hand:

    python tests/multinode.py          # prints one JSON line (addresses, node ids), then reads commands:
    remove trainer | add trainer | remove engine | add engine | stop

Nodes: a head with 1 CPU and no trainer or engine resources (a submitted job's driver; the reward actor with
`reward.resources={onalign_head: 1}`), a
`trainer` node (2 CPUs, custom resource onalign_trainer: 2) and an `engine` node (2 CPUs, onalign_engine: 1).
Runs place their actors there with `train.resources={onalign_trainer: 1}` and
`rollout.resources={onalign_engine: 1}`. Token authentication stays on: start it with RAY_AUTH_MODE=token
(the token in ~/.ray/auth_token) and pass the same to `ray job submit`. Nodes are stopped through the
Cluster object only (never by process name): `remove` stops that node's raylet and its workers, as a lost
machine would."""

from __future__ import annotations

import json
import sys

from common.ports import free_port

NODES = {
    "trainer": {"num_cpus": 2, "resources": {"onalign_trainer": 2}, "object_store_memory": 300 * 2**20},
    "engine": {"num_cpus": 2, "resources": {"onalign_engine": 1}, "object_store_memory": 300 * 2**20},
}


def agent_ports() -> dict[str, int]:
    """Ports of a node's agents, free ones: another Ray on this machine (the test session's own) holds Ray's
    defaults, and a head whose job agent cannot bind answers 'No available agent to submit job'."""
    keys = ("dashboard_agent_listen_port", "metrics_agent_port", "metrics_export_port", "runtime_env_agent_port")
    return {key: free_port("127.0.0.1") for key in keys}


def main() -> None:
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 1, "resources": {"onalign_head": 1}, "include_dashboard": True, "dashboard_port": 0}
    head |= agent_ports() | {"ray_client_server_port": free_port("127.0.0.1")}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
    nodes = {name: cluster.add_node(**spec, **agent_ports()) for name, spec in NODES.items()}
    cluster.wait_for_nodes()

    def report() -> None:
        info = {
            "address": cluster.address,
            "dashboard": "http://" + cluster.head_node.address_info["webui_url"],
            "nodes": {"head": cluster.head_node.node_id} | {name: node.node_id for name, node in nodes.items()},
        }
        print(json.dumps(info), flush=True)

    report()
    try:
        for line in sys.stdin:
            verb, _, name = line.strip().partition(" ")
            if verb == "stop":
                break
            if verb == "remove":
                cluster.remove_node(nodes.pop(name))
            elif verb == "add":
                nodes[name] = cluster.add_node(**NODES[name], **agent_ports())
                cluster.wait_for_nodes()
            report()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
