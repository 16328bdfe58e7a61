"""The compute step makes no host synchronisation for logit targets (issue 18): on a GPU each
nonzero, item, unique or copy to the host would stall the queue. Counted on the CPU at the
dispatcher (what would be a synchronising kernel on a GPU) plus the host-copy calls."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from actwh.compute.scalars import SCALARS, compute_scalars
from actwh.compute.targets import Batch

SYNCING = {"nonzero", "_local_scalar_dense", "item", "is_nonzero", "_unique2", "unique_dim",
           "unique_consecutive", "masked_select", "equal"}


class Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in SYNCING:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("target", ["logit", "logit_diff", "logprob"])
def test_compute_step_makes_no_host_synchronisation(tiny_model, target, monkeypatch):
    model = tiny_model.model
    tokens = torch.tensor([[0, 5, 6, 7, 8, 9], [0, 10, 11, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    b = Batch(tokens, mask, torch.tensor([12, 13]), torch.tensor([14, 15]))
    names = [n for n, s in SCALARS.items() if not s.sae_level and not n.endswith("_attribution")]
    host = []
    for m in ("cpu", "tolist", "numpy", "item"):
        original = getattr(torch.Tensor, m)
        monkeypatch.setattr(torch.Tensor, m, lambda self, *a, _m=m, _o=original, **k:
                            host.append(_m) or _o(self, *a, **k))
    probe = Syncs()
    with probe:  # the probe itself must see a sync: a nonzero is one
        torch.tensor([0, 1]).nonzero()
    assert probe.seen == ["nonzero.default"]
    with Syncs() as counted:
        res = compute_scalars(model, b, target, names)
    assert counted.seen == [] and host == []
    assert res.token["mlp_direct_effect"].abs().sum() > 0  # the step really ran
