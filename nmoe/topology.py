"""Who may route to whom: neighbour sets over client ids (each client reaches itself)."""

from __future__ import annotations

from typing import Any

import networkx as nx


def build_graph(topology_cfg: Any, num_clients: int, seed: int) -> nx.Graph:
    """The undirected communication graph of the configured topology."""
    kind = topology_cfg.kind
    if kind == "full":
        return nx.complete_graph(num_clients)
    if kind == "ring":
        return nx.cycle_graph(num_clients) if num_clients > 2 else nx.complete_graph(num_clients)
    if kind == "regular":
        degree = int(topology_cfg.degree)
        if degree >= num_clients or (degree * num_clients) % 2:
            raise ValueError(
                f"config key 'topology.degree': a {degree}-regular graph on {num_clients} clients "
                "needs degree < clients and degree * clients even"
            )
        return nx.random_regular_graph(degree, num_clients, seed=seed)
    if kind == "geometric":
        return nx.random_geometric_graph(num_clients, float(topology_cfg.radius), seed=seed)
    raise ValueError(f"config key 'topology.kind': unknown topology '{kind}'")


def neighbour_sets(topology_cfg: Any, num_clients: int, seed: int) -> list[list[int]]:
    """Sorted reachable expert ids for each client, itself included."""
    graph = build_graph(topology_cfg, num_clients, seed)
    return [sorted(set(graph.neighbors(i)) | {i}) for i in range(num_clients)]


def describe(topology_cfg: Any, num_clients: int, seed: int) -> dict[str, Any]:
    """A summary for results.json: kind, edges, degrees, connectivity."""
    graph = build_graph(topology_cfg, num_clients, seed)
    return {
        "kind": topology_cfg.kind,
        "edges": sorted([sorted(e) for e in graph.edges()]),
        "degrees": [graph.degree(i) for i in range(num_clients)],
        "connected": bool(nx.is_connected(graph)) if num_clients else True,
    }
