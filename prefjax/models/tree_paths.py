"""Nested parameter dicts addressed by key tuples: ("layers", 3, "attn", "q").

Shared by the Hugging Face importer and LoRA, which both walk the pure params
tree by path and rebuild nested dicts from {path: value} maps.
"""

from __future__ import annotations

from typing import Any


def get(tree: Any, path: tuple) -> Any:
    """tree[path[0]][path[1]]..."""
    for key in path:
        tree = tree[key]
    return tree


def nest(flat: dict[tuple, Any]) -> dict:
    """{key tuple: value} -> nested dict."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return root
