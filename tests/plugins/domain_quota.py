"""A toy selector kept in one file, as a newcomer would write one (tests/selectors/test_selector_plugin.py).

``domain_quota``: visit the domains in turn, each time taking that domain's best remaining
document by quality, until k documents are chosen; each domain's best document is taken
``copies`` times (a multiplicity), every other document once.
"""
import numpy as np

from spokes_lightning.selectors import Param, SelectionResult, Selector, register


@register
class DomainQuota(Selector):
    name = "domain_quota"
    requires = ("domains", "quality")
    summary = "round-robin over domains by quality; each domain's best document twice (toy)"
    params_spec = {"copies": Param(int, 2, lambda v: v >= 1, ">= 1")}

    def select(self, inputs, k, seed=0):
        self.check_inputs(inputs)
        q, domains = np.asarray(inputs.quality), np.asarray(inputs.domains)
        queues = [list(np.flatnonzero(domains == d)[np.argsort(-q[domains == d], kind="stable")])
                  for d in np.unique(domains)]
        chosen, copies, turn = [], [], 0
        while len(chosen) < k:
            queue = queues[turn % len(queues)]
            if queue:
                first = len(queue) == int((domains == domains[queue[0]]).sum())
                chosen.append(int(queue.pop(0)))
                copies.append(self.params["copies"] if first else 1)
            turn += 1
        return SelectionResult(indices=np.array(chosen, dtype=np.int64),
                               multiplicity=np.array(copies, dtype=np.int64),
                               stats={"n_domains": len(queues)})
