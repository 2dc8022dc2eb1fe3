"""RadixTree under random serving traffic (Hypothesis state machine): every step is
checked against the reference model of test_tree_harness (pages, ownership with the
four allocators, the hit rule, the reclaim rule and its order, locked windows), with
requests of several cache salts (pages of one salt are never another's) and the L3
page hashes cached on the nodes (equal to ``storage.keys.page_hashes`` of the path)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_tree_harness import TIERS, WB, WT, WTS, Env, snapshot

from jaxhicache.storage.keys import page_hashes

# "t1" and b"t1" are one tenant; None is the unsalted one.
SALTS = (None, None, "t1", b"t1", "t2")


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
        self.seqs: list[tuple[np.ndarray, str | bytes | None]] = []

    def _key(self, data) -> tuple[np.ndarray, str | bytes | None]:
        """A key and its salt: mostly a previous sequence's salt, sometimes another one
        (the same tokens under another salt must miss)."""
        ps = self.env.ps
        salt = data.draw(st.sampled_from(SALTS), label="salt")
        if self.seqs and data.draw(st.integers(0, 3), label="extend") > 0:
            # Mostly multi-turn traffic: a previous sequence, maybe cut back a little.
            base, base_salt = self.seqs[data.draw(st.integers(0, len(self.seqs) - 1), label="base")]
            if data.draw(st.integers(0, 3), label="keep salt"):
                salt = base_salt
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
        return k[: 10 * ps], salt

    @rule(
        data=st.data(),
        hold=st.booleans(),
        load=st.booleans(),
        sync=st.booleans(),
        swa_all=st.booleans(),
    )
    def request(self, data, hold, load, sync, swa_all):
        for _ in range(data.draw(st.integers(1, 3), label="burst")):
            k, salt = self._key(data)
            hold = hold and len(self.env.held) < 4
            m, _ = self.env.request(
                k, hold=hold, load=load, backup_sync=sync, swa_all=swa_all, salt=salt
            )
            if m.matched_len:
                event("salted hit" if salt is not None else "unsalted hit")
            if len(k) >= self.env.ps:
                self.seqs.append((k, salt))

    @rule(data=st.data())
    def match_only(self, data):
        k, salt = self._key(data)
        self.env.check_match(k, snapshot(self.env.tree), salt)

    @rule(data=st.data())
    def hashes(self, data):
        """L3 hashes of a node's path or of a key (computed and kept on the nodes, then
        sliced by later splits; check_invariants re-derives every kept hash)."""
        tree, ps = self.env.tree, self.env.ps
        nodes = list(tree.iter_nodes())
        if nodes and data.draw(st.booleans(), label="node"):
            n = nodes[data.draw(st.integers(0, len(nodes) - 1), label="which")]
            want = page_hashes(tree.path_tokens(n), ps, salt=n.salt)
            assert tree.path_hashes(n) == want
            assert n.page_hashes == want[n.start :]
        else:
            k, salt = self._key(data)
            before = [(n.id, n.num_pages, n.last_access) for n in nodes]
            assert tree.key_hashes(k, salt=salt) == page_hashes(k, ps, salt=salt)
            # no split, no LRU bump
            assert [(n.id, n.num_pages, n.last_access) for n in tree.iter_nodes()] == before

    @rule(data=st.data())
    def lock_match(self, data):
        """A request that matched and waits (e.g. for its load back): lock only."""
        env = self.env
        if len(env.held) < 4:
            k, salt = self._key(data)
            m = env.check_match(k, snapshot(env.tree), salt)
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
