"""Counting the aten ops a block dispatches: on a GPU each one that is not a view or an allocation is a kernel
launch, so a count that does not grow with the number of parameter tensors means no per-tensor launches."""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

# ops that create views or aliases: no kernel launches
VIEW_OPS = frozenset({"view", "_unsafe_view", "split", "split_with_sizes", "detach", "alias", "reshape", "t",
                      "lift_fresh"})


class OpCounter(TorchDispatchMode):
    """Within ``with counter:`` blocks (it may be entered several times), counts dispatched ops by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def launches(self, ignore: frozenset[str] = VIEW_OPS) -> int:
        """Ops counted, leaving out those named in ``ignore``."""
        return sum(n for name, n in self.counts.items() if name not in ignore)
