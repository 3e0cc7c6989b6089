"""Forward passes that start at a given block: the blocks that run before it return cached outputs.

When one block's weights are perturbed, every block that the forward pass runs *before* it computes
exactly what it computed in the clean forward. :class:`BlockCache` runs the clean forward of one batch
once, recording for every block (group module) the order it ran in, its input and its output. Inside
``cache.start_at(block)``, each block that ran before ``block`` is replaced by a stub that does no
work: it returns its cached output when that output is read by code that still runs (the block just
before ``block`` in the same chain, or the last block of an earlier tower, whose output feeds the
projection heads or the next tower), and otherwise passes its input along (nobody reads it). The loss
is then computed by the model's own code, so nothing family-specific is needed.

The substitution is exact under three conditions, each checked:

- every block runs equally often per forward pass (else ``RuntimeError`` at capture); with c calls
  each, call i of every block is chain i, and only the calls before the first call of the perturbed
  block are skipped;
- a block's hidden-state input is the previous block's output when both belong to one chain
  (checked by identity or equality at capture);
- no cached tensor is modified in place later in the clean forward (checked through the tensors'
  version counters before they are reused).

:meth:`BlockCache.verify` compares the loss of a from-block forward with the clean loss on the
unperturbed model (the same arithmetic on the same inputs, so the two agree to rounding).

Cost: perturbing block k of a chain of L blocks runs blocks k..L-1 (plus whatever the model computes
outside the blocks) instead of all L: on average about half of a decoder's blocks.

No forward-only scheme that measures each block's directional derivative d_k separately can do with
fewer block evaluations, if its measurements are loss differences (linear in the d's for small eps):
a forward that starts at block s gives one number, which involves only d_s..d_{L-1}, so recovering
d_0..d_l takes at least l + 1 forwards that start at or before block l, for every l. The cheapest
such set starts one forward at each block, as here: per sample sum_k (L - k + h) block evaluations
for forward differences, h being what runs after the blocks (an LM head) in block units, twice that
for central ones. For SmolLM2 (L = 30, its 49k-token head about h = 8 blocks) that is 705 against
3L = 90 for the sequential prune of one calibration sample (:mod:`vlmprune.sequential`): at the
defaults (32 scoring, 128 calibration samples) zeroth-order scores cost about twice the prune stage
in block evaluations with forward differences, four times with central ones.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn


def hidden_of(args: tuple, kwargs: dict) -> Tensor:
    """The hidden-state input of a block call: the first positional argument or ``hidden_states``."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("a block was called without a positional input or hidden_states keyword")


def output_hidden(output: Any) -> Tensor:
    """The hidden state a block returns: the output itself or its first element."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(output: Any, hidden: Tensor) -> Any:
    """``output`` with its hidden state replaced by ``hidden`` (same container type)."""
    if isinstance(output, (tuple, list)):
        return type(output)((hidden, *output[1:]))
    return hidden


@dataclass
class _Record:
    order: int
    input: Tensor
    input_version: int
    output: Any
    output_version: int


class BlockCache:
    """Clean-forward records of the blocks ``blocks`` (name -> module) for one batch.

    A loss may run a block more than once (a text encoder applied to two halves of a batch): every
    block must then run the same number of times, and call c of each block forms chain c.
    """

    def __init__(self, blocks: dict[str, nn.Module], chains: dict[str, list[str]]):
        """``chains``: tower name -> its block names in order (each tower is one chain of blocks)."""
        self.blocks = blocks
        self.chains = chains
        self.tower_of = {name: tower for tower, names in chains.items() for name in names}
        self.records: dict[tuple[str, int], _Record] = {}
        self.n_calls = 0
        self.loss: float | None = None

    @torch.no_grad()
    def capture(self, run: Callable[[], Tensor]) -> float:
        """Run the clean forward ``run()`` (returns the loss) once, recording every block call."""
        self.records = {}
        order: list[tuple[str, int]] = []
        count = {name: 0 for name in self.blocks}
        pending: dict[str, tuple[int, Tensor]] = {}

        def pre(name):
            def hook(module, args, kwargs):
                pending[name] = (len(order), hidden_of(args, kwargs))
                order.append((name, count[name]))
            return hook

        def post(name):
            def hook(module, args, kwargs, output):
                position, hidden = pending.pop(name)
                self.records[(name, count[name])] = _Record(
                    position, hidden, hidden._version, output, output_hidden(output)._version)
                count[name] += 1
            return hook

        handles = []
        try:
            for name, block in self.blocks.items():
                handles.append(block.register_forward_pre_hook(pre(name), with_kwargs=True))
                handles.append(block.register_forward_hook(post(name), with_kwargs=True))
            loss = float(run())
        finally:
            for handle in handles:
                handle.remove()
        if len(set(count.values())) != 1 or not order:
            raise RuntimeError(f"cached scoring needs every block to run equally often per forward; got {count}")
        self.n_calls = count[order[0][0]]
        for c in range(self.n_calls):
            for names in self.chains.values():
                for before, after in zip(names, names[1:]):
                    out, inp = output_hidden(self.records[(before, c)].output), self.records[(after, c)].input
                    if not (out is inp or (out.shape == inp.shape and torch.equal(out, inp))):
                        raise RuntimeError(f"cached scoring: the input of {after!r} is not the output of {before!r}")
        self.loss = loss
        return loss

    def _checked(self, key: tuple[str, int]) -> _Record:
        record = self.records[key]
        if output_hidden(record.output)._version != record.output_version or record.input._version != record.input_version:
            raise RuntimeError(f"cached scoring: the forward modified the recorded tensors of {key[0]!r} in place")
        return record

    def _read_later(self, key: tuple[str, int], begin: int) -> bool:
        """Whether code that still runs reads this call's output when the forward starts at ``begin``."""
        name, call = key
        tower = self.chains[self.tower_of[name]]
        following = tower[tower.index(name) + 1:]
        if not following:  # the tower's last block feeds code outside the blocks
            return True
        return self.records[(following[0], call)].order >= begin

    @contextlib.contextmanager
    def start_at(self, start: str) -> Iterator[None]:
        """Within the context, block calls that ran before the first call of ``start`` return cached
        outputs without work; every later call runs for real."""
        if (start, 0) not in self.records:
            raise RuntimeError("capture() must run before start_at()")
        begin = self.records[(start, 0)].order
        stubs: dict[str, list[Callable | None]] = {}
        for (name, call), record in self.records.items():
            if record.order < begin:
                record = self._checked((name, call))
                stub = _cached_output(record.output) if self._read_later((name, call), begin) else _pass_through(record.output)
                stubs.setdefault(name, [None] * self.n_calls)[call] = stub
        try:
            for name, per_call in stubs.items():
                self.blocks[name].forward = _by_call(self.blocks[name].forward, per_call)
            yield
        finally:
            for name in stubs:
                self.blocks[name].__dict__.pop("forward", None)

    @torch.no_grad()
    def verify(self, run: Callable[[], Tensor], rtol: float = 1e-5) -> None:
        """Check, for each tower's last block, that a from-block forward reproduces the clean loss."""
        for names in self.chains.values():
            with self.start_at(names[-1]):
                value = float(run())
            if abs(value - self.loss) > rtol * max(1.0, abs(self.loss)):
                raise RuntimeError(f"cached scoring: starting at {names[-1]!r} gives loss {value!r}, the full "
                                   f"forward {self.loss!r}; this model needs scoring.cache_inputs: false")


def _by_call(real: Callable, per_call: list[Callable | None]) -> Callable:
    """A forward that answers call c of each forward pass with ``per_call[c]`` (None: the real one)."""
    state = {"call": 0}

    def forward(*args, **kwargs):
        call = state["call"]
        state["call"] = (call + 1) % len(per_call)
        chosen = per_call[call] or real
        return chosen(*args, **kwargs)
    return forward


def _cached_output(output: Any) -> Callable:
    def forward(*args, **kwargs):
        return output
    return forward


def _pass_through(output: Any) -> Callable:
    def forward(*args, **kwargs):
        return with_hidden(output, hidden_of(args, kwargs))
    return forward
