"""Independent reference computations shared by the tests (imported as ``from oracles import ...``)."""
from __future__ import annotations

import torch


def greedy_from_ids(model, ids: list[int], n_new: int, eos) -> list[int]:
    """Unbatched greedy decoding, one full forward per token: the oracle for batched / cached generation."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(torch.argmax(model(input_ids=torch.tensor([ids + out])).logits[0, -1]))
            if nxt in eos:
                break
            out.append(nxt)
    return out
