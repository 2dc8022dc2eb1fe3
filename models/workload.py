"""A deterministic synthetic multi-turn chat workload for the main job (:mod:`models.multiturn`).

Model of the traffic (in the spirit of ``shared/bench/workload.py``, written for
a serving loop whose answers come from the model)::

    WorkloadConfig ──> Workload
                         structure (seed):  each client's system prompt, the length of
                                            every user segment and answer, the schedule
                         content (seed, variant): the token ids of the system prompts and
                                            user segments
                             │
                             v
                       Transcript: prompt(client, turn) = system + user_1 + answer_1 + ...
                             │       + user_turn, where answer_k is what the model generated
                             v       (greedy) for turn k: record(client, turn, generated)
                       the serving loop

* ``system_prompts`` shared system prompts of ``system_prompt_len`` tokens; each
  client picks one uniformly.
* ``clients`` conversations of ``turns`` turns; turn ``t`` appends a user segment
  (about ``user_tokens``) and the model's answer (about ``gen_tokens``, the
  request's ``max_new_tokens``); lengths are drawn uniformly from
  ``[round(n (1 - jitter)), round(n (1 + jitter))]``.
* Every client also has one more user segment (turn ``turns + 1``): the L3 probe
  of the main job asks it after the whole conversation.
* Schedule: rounds; in round ``t`` every client asks its turn ``t``, in an order
  the seeded RNG shuffles per round, so a client's next turn comes after about
  ``clients - 1`` other requests (what pushes its pages down the tiers).

Determinism: the structure (lengths, system prompt choice, schedule) depends on
``seed`` only; the token ids on ``seed`` and ``variant``. Two variants of one
config are the same traffic with different tokens: the main job warms every
program shape up on variant 1 and times variant 0, and no page of one equals a
page of the other. :meth:`Workload.digest` hashes structure and content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import final

import numpy as np

__all__ = ["Transcript", "Turn", "Workload", "WorkloadConfig"]

TOKEN_DTYPE = np.int32


def _check_int(name: str, value, lo: int) -> None:
    if type(value) is bool or not isinstance(value, int) or value < lo:
        raise ValueError(f"WorkloadConfig.{name} must be an int >= {lo}, got {value!r}")


@final
@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """Shape of the traffic; every field is checked (``ValueError`` names field and value).

    Attributes:
      seed: seeds the structure and the content (see the module docstring).
      clients: concurrent conversations.
      turns: turns per conversation.
      system_prompts: distinct shared system prompts.
      system_prompt_len: tokens per system prompt.
      user_tokens / gen_tokens: mean user segment / answer length per turn.
      jitter: relative spread of those lengths, in ``[0, 1)``.
      vocab: token ids are drawn from ``[0, vocab)``.
    """

    seed: int = 0
    clients: int = 4
    turns: int = 4
    system_prompts: int = 2
    system_prompt_len: int = 1024
    user_tokens: int = 128
    gen_tokens: int = 32
    jitter: float = 0.25
    vocab: int = 512

    def __post_init__(self):
        _check_int("seed", self.seed, 0)
        for name in ("clients", "turns", "system_prompts", "user_tokens", "gen_tokens", "vocab"):
            _check_int(name, getattr(self, name), 1)
        _check_int("system_prompt_len", self.system_prompt_len, 0)
        j = self.jitter
        if type(j) is bool or not isinstance(j, int | float) or not 0 <= j < 1:
            raise ValueError(f"WorkloadConfig.jitter must be a number in [0, 1), got {j!r}")


@final
@dataclasses.dataclass(frozen=True)
class Turn:
    """One request of the schedule: ``client`` asks its turn ``turn`` (1-based)."""

    index: int  # position in the schedule
    client: int
    turn: int
    user_len: int
    gen_len: int  # the request's max_new_tokens (greedy decoding, no stop token)


@final
class Workload:
    """Materialises the structure and the token content of a :class:`WorkloadConfig`.

    ``variant`` changes the token ids only (same lengths, same schedule).
    """

    def __init__(self, config: WorkloadConfig, *, variant: int = 0):
        if not isinstance(config, WorkloadConfig):
            raise ValueError(f"config must be a WorkloadConfig, got {type(config).__name__}")
        if type(variant) is bool or not isinstance(variant, int) or variant < 0:
            raise ValueError(f"variant must be an int >= 0, got {variant!r}")
        self.config = c = config
        self.variant = variant
        structure = np.random.default_rng(np.random.SeedSequence([c.seed, 0]))
        schedule_rng = np.random.default_rng(np.random.SeedSequence([c.seed, 1]))
        content = np.random.default_rng(np.random.SeedSequence([c.seed, 2, variant]))

        def draw_len(n: int) -> int:
            lo = max(1, round(n * (1 - c.jitter)))
            hi = max(lo, round(n * (1 + c.jitter)))
            return int(structure.integers(lo, hi + 1))

        self.system_of = tuple(int(structure.integers(c.system_prompts)) for _ in range(c.clients))
        # per client: (user_len, gen_len) of turns 1..turns, then the probe's user length
        self._user_len = [
            [draw_len(c.user_tokens) for _ in range(c.turns + 1)] for _ in range(c.clients)
        ]
        self._gen_len = [[draw_len(c.gen_tokens) for _ in range(c.turns)] for _ in range(c.clients)]
        self.system_prompts = tuple(
            content.integers(0, c.vocab, c.system_prompt_len, dtype=TOKEN_DTYPE)
            for _ in range(c.system_prompts)
        )
        self._user = [
            [content.integers(0, c.vocab, n, dtype=TOKEN_DTYPE) for n in lens]
            for lens in self._user_len
        ]
        turns: list[Turn] = []
        for t in range(1, c.turns + 1):  # a round: every client once, in a seeded order
            for client in schedule_rng.permutation(c.clients).tolist():
                turns.append(
                    Turn(
                        len(turns),
                        client,
                        t,
                        self._user_len[client][t - 1],
                        self.gen_len(client, t),
                    )
                )
        self.schedule: tuple[Turn, ...] = tuple(turns)

    def __len__(self) -> int:
        return len(self.schedule)

    def user(self, client: int, turn: int) -> np.ndarray:
        """The user segment of ``client``'s turn ``turn`` (``turns + 1``: the probe's)."""
        return self._user[client][turn - 1]

    def gen_len(self, client: int, turn: int) -> int:
        return self._gen_len[client][turn - 1]

    def prompt_len(self, client: int, turn: int) -> int:
        """Prompt tokens of ``client``'s turn ``turn`` (``turns + 1``: the probe), from lengths only."""
        c = self.config
        done = sum(self._user_len[client][k] + self._gen_len[client][k] for k in range(turn - 1))
        return c.system_prompt_len + done + self._user_len[client][turn - 1]

    def request_pages(self, page_size: int, *, probe_gen: int = 1) -> int:
        """The most pages one request holds (prompt + answer - 1 tokens), probes included."""
        most = 0
        for client in range(self.config.clients):
            for t in range(1, self.config.turns + 2):
                gen = probe_gen if t > self.config.turns else self.gen_len(client, t)
                most = max(most, math.ceil((self.prompt_len(client, t) + gen - 1) / page_size))
        return most

    def distinct_pages(self, page_size: int) -> int:
        """Whole pages of distinct content the schedule inserts (shared system prompts once)."""
        c = self.config
        used = set(self.system_of)
        sys_pages = len(used) * (c.system_prompt_len // page_size)
        own = 0
        for client in range(c.clients):
            end = self.prompt_len(client, c.turns) + self.gen_len(client, c.turns) - 1
            own += end // page_size - c.system_prompt_len // page_size
        return sys_pages + own

    def digest(self) -> str:
        """sha256 over the structure and every token of the system prompts and user segments."""
        h = hashlib.sha256()
        h.update(repr((dataclasses.astuple(self.config), self.variant, self.system_of)).encode())
        h.update(repr([(t.client, t.turn, t.user_len, t.gen_len) for t in self.schedule]).encode())
        for s in self.system_prompts:
            h.update(s.tobytes())
        for segs in self._user:
            for u in segs:
                h.update(u.tobytes())
        return h.hexdigest()


@final
class Transcript:
    """The conversations so far: builds each turn's prompt and records the model's answer.

    ``prompt(client, turn)`` is ``history + user(client, turn)``; ``record`` appends
    that user segment and the generated tokens to the history. Turns of one client
    are asked in order (the schedule guarantees it; anything else raises).
    """

    def __init__(self, workload: Workload):
        self.workload = workload
        self._history = [workload.system_prompts[s] for s in workload.system_of]
        self._next = [1] * workload.config.clients

    def prompt(self, client: int, turn: int) -> np.ndarray:
        if turn != self._next[client]:
            raise ValueError(f"client {client} is at turn {self._next[client]}, not {turn}")
        return np.concatenate([self._history[client], self.workload.user(client, turn)])

    def record(self, client: int, turn: int, generated: np.ndarray) -> None:
        prompt = self.prompt(client, turn)
        self._history[client] = np.concatenate([prompt, np.asarray(generated, TOKEN_DTYPE)])
        self._next[client] += 1

    def probe_prompt(self, client: int) -> np.ndarray:
        """The whole conversation of ``client`` plus its probe user segment."""
        turns = self.workload.config.turns
        if self._next[client] != turns + 1:
            raise ValueError(f"client {client} has not finished its {turns} turns")
        return np.concatenate([self._history[client], self.workload.user(client, turns + 1)])
