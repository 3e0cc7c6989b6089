"""Forward passes that start at a given block: the blocks that run before it return cached outputs.

When one block's weights are perturbed, every block that the forward pass runs *before* it computes
exactly what it computed in the clean forward. :class:`BlockCache` runs the clean forward of one batch
once, recording for every block (group module) the order it ran in. Inside ``cache.start_at(block)``,
each block that ran before ``block`` is replaced by a stub that does no work: it returns its clean
output when that output is read by code that still runs (the block just before ``block`` in the same
chain, or the last block of an earlier tower, whose output feeds the projection heads or the next
tower), and otherwise passes its input along (nobody reads it). The loss is then computed by the
model's own code, so nothing family-specific is needed.

Only the outputs some later forward may read are held: the last output of a tower that later code
reads, and the output of the block before the one being perturbed, computed again (one block
evaluation) when it is first needed. Scoring the blocks in the order they run, the cache holds one
hidden state per chain instead of one per block: for SmolLM2 at 8 x 512 tokens, 9.4 MB instead of
30 x 9.4 MB.

The substitution is exact under four conditions, each checked:

- every block runs equally often per forward pass (else ``RuntimeError`` at capture); with c calls
  each, call i of every block is chain i, and only the calls before the first call of the perturbed
  block are skipped;
- a block's hidden-state input is the previous block's output when both belong to one chain
  (checked by identity or equality at capture);
- no held output is modified in place by a later forward (checked through the tensors' version
  counters before they are reused);
- the clean forward is deterministic, so an output computed again equals the captured one (checked
  by :meth:`BlockCache.verify`, whose from-block forwards use outputs computed again).

:meth:`BlockCache.verify` compares the loss of a from-block forward with the clean loss on the
unperturbed model (the same arithmetic on the same inputs, so the two agree to rounding).

Towers that run *after* the perturbed block, in another tower, may not depend on it at all (the text
tower of a dual encoder, run after its image tower). Each call of such a tower is answered from the
clean forward when all its inputs are the clean ones: at its first block, the hidden input and every
other argument (masks, cross-attention states) must equal those of the clean forward, and so must
the other arguments of each of its later blocks; its blocks then pass their input along and its last
block returns its clean output. If the first block's inputs differ (a language model reading the
image tower's features), the tower runs for real. If they match but a later block's other arguments
differ (a tower that reads the perturbed one only from its second block on), the forward is abandoned
and run again (:meth:`BlockCache.run`) with that tower always running for real.

Cost: perturbing block k of a chain of L blocks runs blocks k..L-1 (plus whatever the model computes
outside the blocks) instead of all L: on average about half of a decoder's blocks.

No forward-only scheme that measures each block's directional derivative d_k separately can do with
fewer block evaluations, if its measurements are loss differences (linear in the d's for small eps):
a forward that starts at block s gives one number, which involves only d_s..d_{L-1}, so recovering
d_0..d_l takes at least l + 1 forwards that start at or before block l, for every l. The cheapest
such set starts one forward at each block, as here: per sample sum_k (L - k + h) block evaluations
for forward differences, h being what runs after the blocks (an LM head) in block units, twice that
for central ones (plus L - 1 evaluations here, to compute each block's clean input again). For SmolLM2
(L = 30, its 49k-token head about h = 8 blocks) that is 705 (734 here) against
3L = 90 for the sequential prune of one calibration sample (:mod:`vlmprune.sequential`): at the
defaults (32 scoring, 128 calibration samples) zeroth-order scores cost about twice the prune stage
in block evaluations with forward differences, four times with central ones. Measured, the head and
the loss cost about 17 blocks rather than 8 (the softmax over the vocabulary); the loss linearised at
the head's input (``zeroth_order``'s ``head``) takes h to about 0, and the count to 465 + L - 1 = 494.
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


def other_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block call's arguments without its hidden-state input (see :func:`hidden_of`)."""
    if args:
        return args[1:], kwargs
    return (), {k: v for k, v in kwargs.items() if k != "hidden_states"}


_OPAQUE = object()  # stands for an argument that is kept by no reference and equals nothing


def _comparable(value: Any) -> Any:
    """``value`` as it can be held and compared later: tensors (by reference), containers of them and
    plain values as they are; any other object (a key-value cache, which would hold every layer's keys
    and values alive) becomes ``_OPAQUE``, so a call that passes one is never answered."""
    if isinstance(value, (Tensor, type(None), bool, int, float, str)):
        return value
    if type(value) in (tuple, list):
        return type(value)(_comparable(item) for item in value)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return _OPAQUE


def _versions(value: Any) -> list[tuple[Tensor, int]]:
    """Every tensor inside ``value`` (nested tuples, lists, dicts) with its version counter now."""
    if isinstance(value, Tensor):
        return [(value, value._version)]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _versions(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _versions(item)]
    return []


def _same(a: Any, b: Any) -> bool:
    """Whether a call argument ``a`` equals a recorded one ``b`` (see :func:`_comparable`): tensors by
    value, containers item by item, plain values (None, numbers, strings) by ==; nothing equals
    ``_OPAQUE``."""
    if b is _OPAQUE:
        return False
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (type(None), bool, int, float, str)) and type(a) is type(b):
        return a == b
    return False


@dataclass
class _Inputs:
    """What a block call of a later tower read in the clean forward: its other arguments, and for the
    tower's first block its hidden input; held by reference, with the tensors' version counters."""
    hidden: Tensor | None
    other: tuple[tuple, dict]
    versions: list[tuple[Tensor, int]]

    def matches(self, args: tuple, kwargs: dict, first: bool) -> bool:
        if any(t._version != v for t, v in self.versions):  # changed in place since: not comparable
            return False
        if first and not _same(hidden_of(args, kwargs), self.hidden):
            return False
        return _same(other_inputs(args, kwargs), self.other)


@dataclass
class _Record:
    order: int
    shell: Any  # the block's output with its hidden state left out (None for a bare tensor)
    hidden: Tensor | None = None  # the clean output hidden state, while some forward may still read it
    version: int = 0


class _Stop(Exception):
    """Ends a forward pass once the output it was run for has been recorded."""


class _NotClean(Exception):
    """A later tower answered from the clean forward turned out to read a changed input."""

    def __init__(self, tower: str):
        super().__init__(tower)
        self.tower = tower


class BlockCache:
    """Clean-forward records of the blocks ``blocks`` (name -> module) for one batch.

    A loss may run a block more than once (a text encoder applied to two halves of a batch): every
    block must then run the same number of times, and call c of each block forms chain c.

    Memory: a record keeps a block's output only while a forward that starts at a later block can
    still read it. The output a forward from block k reads (that of block k - 1) is computed when the
    first forward from block k is asked for, by a clean forward from block k - 1 that stops after it
    (one block evaluation; its input, the output of block k - 2, is still held when blocks are scored
    in the order they run). So at any time a chain holds one hidden state, plus the last output of each
    tower that later towers read, instead of one per block. Each tower after the first to run also
    keeps its first block's clean input and its last block's clean output (to be answered from the
    clean forward), and references to the other arguments of its block calls (masks, position
    embeddings: usually one tensor shared by all blocks).
    """

    def __init__(self, blocks: dict[str, nn.Module], chains: dict[str, list[str]]):
        """``chains``: tower name -> its block names in order (each tower is one chain of blocks)."""
        self.blocks = blocks
        self.chains = chains
        self.tower_of = {name: tower for tower, names in chains.items() for name in names}
        self.previous = {after: before for names in chains.values() for before, after in zip(names, names[1:])}
        self.records: dict[tuple[str, int], _Record] = {}
        self.inputs: dict[tuple[str, int], _Inputs] = {}  # block calls of every tower but the first to run
        self.run_for_real: set[str] = set()  # later towers found to read a perturbed tower past their first block
        self._call_counters: list[dict] = []
        self.n_calls = 0
        self.loss: float | None = None
        self._run: Callable[[], Tensor] | None = None

    @torch.no_grad()
    def capture(self, run: Callable[[], Tensor]) -> float:
        """Run the clean forward ``run()`` (returns the loss) once, recording every block call; ``run`` is
        called again, with earlier blocks skipped, whenever a dropped output is needed once more, so it
        must compute the same clean forward each time (re-seed inside it if the loss draws randomness)."""
        self.records, self.inputs = {}, {}
        order: list[tuple[str, int]] = []
        count = {name: 0 for name in self.blocks}
        pending: dict[str, int] = {}
        unread: dict[tuple[str, int], Tensor] = {}  # outputs until the next block of the chain takes them

        def pre(name):
            def hook(module, args, kwargs):
                call, before = count[name], self.previous.get(name)
                if before is not None:
                    out, inp = unread.pop((before, call), None), hidden_of(args, kwargs)
                    if out is None or not (out is inp or (out.shape == inp.shape and torch.equal(out, inp))):
                        raise RuntimeError(f"cached scoring: the input of {name!r} is not the output of {before!r}")
                pending[name] = len(order)
                order.append((name, call))
                if self.tower_of[name] != self.tower_of[order[0][0]]:  # a later tower: it may be answered
                    other = _comparable(other_inputs(args, kwargs))
                    hidden = hidden_of(args, kwargs) if before is None else None
                    self.inputs[(name, call)] = _Inputs(hidden, other, _versions((hidden, other)))
            return hook

        def post(name):
            def hook(module, args, kwargs, output):
                key, hidden = (name, count[name]), output_hidden(output)
                unread[key] = hidden
                self.records[key] = _Record(pending.pop(name), with_hidden(output, None), version=hidden._version)
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
        last = len(order) - 1
        for key, hidden in unread.items():  # each tower's last outputs: kept if code after them may be
            record = self.records[key]      # skipped, or if the tower itself may be answered (a later tower)
            if record.order < last or key in self.inputs:  # its version as the block returned it, so that
                record.hidden = hidden                      # later in-place writes are caught
        self.loss, self._run = loss, run
        return loss

    def begin(self, start: str) -> int:
        """Position, in the clean forward, of the first call of block ``start``."""
        if (start, 0) not in self.records:
            raise RuntimeError("capture() must run before start_at()")
        return self.records[(start, 0)].order

    def held(self) -> int:
        """How many block outputs the cache holds now."""
        return sum(record.hidden is not None for record in self.records.values())

    def _read_later(self, key: tuple[str, int], begin: int) -> bool:
        """Whether code that still runs reads this call's output when the forward starts at ``begin``
        (false for every later ``begin`` once false)."""
        name, call = key
        tower = self.chains[self.tower_of[name]]
        following = tower[tower.index(name) + 1:]
        if not following:  # the tower's last block feeds code outside the blocks
            return True
        return self.records[(following[0], call)].order >= begin

    def _prepare(self, begin: int) -> list[tuple[str, int]]:
        """Compute again the outputs a forward from ``begin`` reads and the cache no longer holds; drop
        those no forward from ``begin`` or later reads. Returns the calls that ran before ``begin``."""
        skipped = sorted((key for key, r in self.records.items() if r.order < begin),
                         key=lambda k: self.records[k].order)
        read = [key for key in skipped if self._read_later(key, begin)]
        for key in read:
            missing, name = [], key[0]
            while name is not None and self.records[(name, key[1])].hidden is None:
                missing.append((name, key[1]))
                name = self.previous.get(name)
            for each in reversed(missing):  # from the earliest: each one reads the one before
                self._recompute(each)
        for key in set(skipped) - set(read):
            self.records[key].hidden = None
        return skipped

    def _recompute(self, key: tuple[str, int]) -> None:
        """A clean forward from block ``key[0]`` that stops once call ``key[1]`` of it has returned."""
        name, call = key
        calls = [0]

        def hook(module, args, kwargs, output):
            if calls[0] == call:
                hidden = output_hidden(output)
                self.records[key].hidden, self.records[key].version = hidden, hidden._version
                raise _Stop
            calls[0] += 1

        handle = self.blocks[name].register_forward_hook(hook, with_kwargs=True)
        try:
            with self.start_at(name):
                self.run(self._run)
        except _Stop:
            pass
        finally:
            handle.remove()
        if self.records[key].hidden is None:
            raise RuntimeError(f"cached scoring: a forward from {name!r} never returned from its call {call}")

    @contextlib.contextmanager
    def start_at(self, start: str) -> Iterator[None]:
        """Within the context, block calls that ran before the first call of ``start`` return cached
        outputs without work; every later call runs for real."""
        begin = self.begin(start)
        stubs: dict[str, list[Callable | None]] = {}
        for key in self._prepare(begin):
            record = self.records[key]
            if record.hidden is None:
                stub = _pass_through(record.shell)
            elif record.hidden._version != record.version:
                raise RuntimeError(f"cached scoring: the forward modified the recorded output of {key[0]!r} in place")
            else:
                stub = _cached_output(with_hidden(record.shell, record.hidden))
            stubs.setdefault(key[0], [None] * self.n_calls)[key[1]] = stub
        perturbed = self.tower_of[start]
        for tower, names in self.chains.items():
            for call in range(self.n_calls):
                if (tower != perturbed and tower not in self.run_for_real and (names[0], call) in self.inputs
                        and self.records[(names[0], call)].order > begin):
                    for name, stub in self._answer_if_clean(tower, names, call).items():
                        stubs.setdefault(name, [None] * self.n_calls)[call] = stub
        try:
            for name, per_call in stubs.items():
                counter = {"call": 0}
                self._call_counters.append(counter)
                self.blocks[name].forward = _by_call(self.blocks[name].forward, per_call, counter)
            yield
        finally:
            self._call_counters = []
            for name in stubs:
                self.blocks[name].__dict__.pop("forward", None)

    def run(self, forward: Callable[[], Any]) -> Any:
        """``forward()`` inside :meth:`start_at`; if a later tower answered from the clean forward turns
        out to read a changed input past its first block, that tower runs for real from then on and
        ``forward()`` runs again (so ``forward`` must re-seed any randomness it draws); at most once more
        per later tower, since a tower that runs for real is never answered again."""
        while True:
            try:
                return forward()
            except _NotClean as error:
                self.run_for_real.add(error.tower)
                for counter in self._call_counters:  # the abandoned forward left its block calls half counted
                    counter["call"] = 0

    def _answer_if_clean(self, tower: str, names: list[str], call: int) -> dict[str, Callable]:
        """Stubs for call ``call`` of a later tower (block names ``names``) that answer it from the clean
        forward when its inputs are the clean ones (module docstring), and run it for real otherwise."""
        last = self.records[(names[-1], call)]
        if last.hidden is None or last.hidden._version != last.version:
            raise RuntimeError(f"cached scoring: the forward modified the recorded output of {names[-1]!r} in place")
        clean_output = with_hidden(last.shell, last.hidden)
        answered = {"yes": False}
        stubs = {}
        for i, name in enumerate(names):
            def forward(*args, _name=name, _first=i == 0, _last=i == len(names) - 1,
                        _real=self.blocks[name].forward, _shell=self.records[(name, call)].shell, **kwargs):
                recorded = self.inputs[(_name, call)]
                if _first:
                    answered["yes"] = tower not in self.run_for_real and recorded.matches(args, kwargs, True)
                if not answered["yes"]:
                    return _real(*args, **kwargs)
                if not _first and not recorded.matches(args, kwargs, False):
                    raise _NotClean(tower)
                return clean_output if _last else with_hidden(_shell, hidden_of(args, kwargs))
            stubs[name] = forward
        return stubs

    @torch.no_grad()
    def verify(self, run: Callable[[], Tensor], rtol: float = 1e-5) -> None:
        """Check, for each tower's last block, that a from-block forward reproduces the clean loss.

        ``run`` should draw the same randomness as the recorded forward (re-seed as it did); even then,
        randomness inside the blocks (dropout in train mode) fails the check, as it should: the blocks
        skipped draw no random numbers, so the later ones draw different ones than in the clean forward.
        """
        for names in self.chains.values():
            with self.start_at(names[-1]):
                value = float(self.run(run))
            if abs(value - self.loss) > rtol * max(1.0, abs(self.loss)):
                raise RuntimeError(f"cached scoring: starting at {names[-1]!r} gives loss {value!r}, the full "
                                   f"forward {self.loss!r}; this model needs scoring.cache_inputs: false (so does "
                                   f"randomness in the forward, such as dropout in train mode: skipped blocks "
                                   f"draw no random numbers, so later blocks draw different ones)")


def _by_call(real: Callable, per_call: list[Callable | None], state: dict) -> Callable:
    """A forward that answers call c of each forward pass with ``per_call[c]`` (None: the real one);
    ``state["call"]`` counts the calls."""

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


def _pass_through(shell: Any) -> Callable:
    def forward(*args, **kwargs):
        return with_hidden(shell, hidden_of(args, kwargs))
    return forward
