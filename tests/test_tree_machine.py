"""RadixTree under random serving traffic (Hypothesis state machine): every step is
checked against the reference model of test_tree_harness (pages, ownership with the
four allocators, the hit rule, the reclaim rule and its order, locked windows)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_tree_harness import TIERS, WB, WT, WTS, Env, snapshot


class TreeMachine(RuleBasedStateMachine):
    """Random serving traffic against the tree, checked after every step."""

    @initialize(
        ps=st.sampled_from([1, 2, 4]),
        swa=st.sampled_from([0, 1, 2, 3]),
        policy=st.sampled_from([WT, WTS, WB]),
        dev=st.sampled_from([10, 16, 40]),
        host=st.sampled_from([8, 24, 60]),
        swa_cap=st.sampled_from([None, 6, 12]),
    )
    def setup(self, ps, swa, policy, dev, host, swa_cap):
        self.env = Env(ps, swa, policy, dev, host, swa_cap=swa_cap)
        self.seqs: list[np.ndarray] = []

    def _key(self, data) -> np.ndarray:
        ps = self.env.ps
        if self.seqs and data.draw(st.integers(0, 3), label="extend") > 0:
            # Mostly multi-turn traffic: a previous sequence, maybe cut back a little.
            base = self.seqs[data.draw(st.integers(0, len(self.seqs) - 1), label="base")]
            npages = len(base) // ps
            if data.draw(st.booleans(), label="near end"):
                cut = max(0, npages - data.draw(st.integers(0, 2), label="back"))
            else:
                cut = data.draw(st.integers(0, npages), label="cut")
            base = base[: cut * ps]
        else:
            base = np.zeros(0, dtype=np.int64)
        more = data.draw(st.lists(st.integers(0, 2), min_size=0, max_size=5 * ps), label="more")
        k = np.concatenate([base, np.array(more, dtype=np.int64)])
        return k[: 10 * ps]

    @rule(
        data=st.data(),
        hold=st.booleans(),
        load=st.booleans(),
        sync=st.booleans(),
        swa_all=st.booleans(),
    )
    def request(self, data, hold, load, sync, swa_all):
        for _ in range(data.draw(st.integers(1, 3), label="burst")):
            k = self._key(data)
            hold = hold and len(self.env.held) < 4
            self.env.request(k, hold=hold, load=load, backup_sync=sync, swa_all=swa_all)
            if len(k) >= self.env.ps:
                self.seqs.append(k)

    @rule(data=st.data())
    def match_only(self, data):
        self.env.check_match(self._key(data), snapshot(self.env.tree))

    @rule(data=st.data())
    def lock_match(self, data):
        """A request that matched and waits (e.g. for its load back): lock only."""
        env = self.env
        if len(env.held) < 4:
            m = env.check_match(self._key(data), snapshot(env.tree))
            if m.node is not env.tree.root:
                env.tree.inc_lock(m.node)
                env.held.append(m.node)
                env._record_window(m.node)

    @precondition(lambda self: self.env.held)
    @rule(data=st.data())
    def unlock(self, data):
        i = data.draw(st.integers(0, len(self.env.held) - 1))
        self.env.release(self.env.held[i])

    @rule(n=st.integers(1, 12))
    def evict_device(self, n):
        self.env.evict_device(n)

    @rule(n=st.integers(1, 12))
    def evict_host(self, n):
        self.env.evict_host(n)

    @precondition(lambda self: self.env.tree.swa_pages)
    @rule(n=st.integers(0, 12) | st.just(99), tier=st.sampled_from(TIERS), keep=st.booleans())
    def reclaim_swa(self, n, tier, keep):
        self.env.reclaim(n, tier, keep_branch_windows=keep)

    @precondition(lambda self: self.env.tree.num_nodes)
    @rule(data=st.data())
    def start_backup(self, data):
        nodes = [n for n in self.env.tree.iter_nodes() if n.device_full is not None]
        if nodes and len(self.env.pending) < 3:
            self.env.start_backup(nodes[data.draw(st.integers(0, len(nodes) - 1))])

    @precondition(lambda self: self.env.pending)
    @rule(data=st.data())
    def complete_backup(self, data):
        self.env.complete_backup(data.draw(st.integers(0, len(self.env.pending) - 1)))

    @invariant()
    def consistent(self):
        if hasattr(self, "env"):
            self.env.check()

    def teardown(self):
        if hasattr(self, "env"):
            for name, count in self.env.events.items():
                if count:
                    event(name)


TreeMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_tree_state_machine = TreeMachine.TestCase
