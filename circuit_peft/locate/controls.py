"""Random circuits of the same size as a located one: the controls that show whether locating mattered.

* ``match="layer"``: the same kinds and counts in the same layers, other (random) indices;
* ``match="anywhere"``: the same kinds and counts, random layers and indices.

A located circuit that trains no better than its random twins has not earned its choice.
"""

from __future__ import annotations

import random
from collections import Counter

from ..arch import Component
from ..circuit import Circuit
from ..circuits.io import per_layer_count

RANDOM_MATCHES: tuple[str, ...] = ("layer", "anywhere")


def random_circuit(like: Circuit, match: str = "layer", seed: int = 0) -> Circuit:
    """A random circuit with as many components of each kind as ``like`` (``match``: see module doc).

    Needs ``like.fingerprint`` (the model's sizes). Deterministic in ``seed``.
    """
    if match not in RANDOM_MATCHES:
        raise ValueError(f"match must be one of {RANDOM_MATCHES}, got {match!r}")
    fp = like.require_fingerprint("random_circuit")
    rng = random.Random(f"{seed}:{match}")
    if match == "layer":
        groups = Counter((c.kind, c.layer) for c in like.components)
        kept = [Component(kind, layer, i) for (kind, layer), n in sorted(groups.items())
                for i in rng.sample(range(per_layer_count(fp, kind)), n)]
    else:
        per_kind = Counter(c.kind for c in like.components)
        kept = []
        for kind, n in sorted(per_kind.items()):
            width = per_layer_count(fp, kind)
            flat = rng.sample(range(fp["n_layers"] * width), n)
            kept += [Component(kind, f // width, f % width) for f in flat]
    return Circuit(kept, fingerprint=fp, method=f"random_{match}",
                   meta={"like": like.method, "seed": seed, "match": match})


__all__ = ["RANDOM_MATCHES", "random_circuit"]
