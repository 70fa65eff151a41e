"""Model families behind one calling convention:

    model(tokens, positions, segment_ids, cache=None) -> (logits, cache, aux)
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from maxllm.models.llama import Llama
from maxllm.models.mamba import Mamba
from maxllm.models.mixtral import Mixtral

FAMILIES: dict[str, type[nnx.Module]] = {"llama": Llama, "mixtral": Mixtral, "mamba": Mamba}


def build_model(cfg: Any, seed: int) -> nnx.Module:
    """A model of `cfg.family` with parameters drawn from `seed`."""
    return FAMILIES[cfg.family](cfg, rngs=nnx.Rngs(params=seed))
