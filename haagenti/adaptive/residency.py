"""Residency that follows the schedule: a switcher whose layers hold only the precision tiers
the running and the next step need, read from the fragment library (tiers.LayerTiers).

On `__enter__` each Linear/Conv2d of the denoiser is replaced by a TierLayer (the same bias and
configuration, no weight of its own) and the denoiser's own weights are released: their
Parameters stay, emptied, and `__exit__` reads them back from the library bit for bit (`check`
made sure they are the stored model's). Step 0's tiers are read then. While sampling, as soon
as a layer has run its last pass of step i, the tiers step i+1 does not need are dropped from it
and the ones it needs are requested; a worker thread reads what has been requested so far from
the library, a few layers at a time, while the rest of step i runs, so the switch does not stall
step i+1. Memory therefore moves layer by layer from one tier to the next: the peak is about the
larger tier, not the sum of the two. A layer whose tier has not arrived when it runs waits for
it (`waits` counts those). After the last step the handover is to step 0, for the pipeline's next
call.

`keep_all=True` reads every tier the schedule uses on `__enter__` and keeps them: the
all-resident baseline on the same weights (its outputs are bit-identical)."""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from haagenti.adaptive.precision import Precision
from haagenti.adaptive.quantize import QuantizedTensor, held_bytes, install, layer_paths
from haagenti.adaptive.schedule import PrecisionSchedule
from haagenti.adaptive.switch import PrecisionSwitcher, _distinct
from haagenti.adaptive.tiers import LayerTiers

WORKER = "haagenti-tiers"  # the prefetch thread's name prefix


@dataclass(frozen=True)
class TierLoad:
    layers: tuple[str, ...]
    precision: Precision
    requested_in: int | None  # the step whose last pass asked for it; None: before sampling or a layer that ran without it
    thread: str
    seconds: float


class TierLayer(nn.Module):
    """A Linear or Conv2d computing with whichever tier its switcher runs, dequantised per call."""

    def __init__(self, path: str, layer: nn.Linear | nn.Conv2d, switcher: "StreamingSwitcher"):
        super().__init__()
        self.path, self.weight_name = path, f"{path}.weight"
        self.bias = layer.bias  # the denoiser's own, shared
        self._apply_weight = layer._conv_forward if isinstance(layer, nn.Conv2d) else F.linear
        self.switcher = switcher
        self.tiers: dict[Precision, Future[QuantizedTensor]] = {}
        self.passes = 0  # passes run in the current step
        self.ready_for: int | None = None  # the step whose tiers were last requested

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._apply_weight(x, self.switcher._weight(self).dequantize(), self.bias)
        self.switcher._ran(self)
        return y


class StreamingSwitcher(PrecisionSwitcher):
    """`with StreamingSwitcher(pipe.unet, pipe.scheduler, schedule, LayerTiers(library, model_id)):
    pipe(...)` runs the schedule holding only the tiers the running and next step need.
    `peak_bytes` is the most that the denoiser's tensors and the tier buffers (staging
    included) held at once from `__enter__` to the end of sampling, counted at every allocation;
    per-call dequantised weights are temporaries of the call, like activations, and not counted."""

    def __init__(self, denoiser: nn.Module, scheduler, schedule: PrecisionSchedule, tiers: LayerTiers, keep_all: bool = False):
        super().__init__(denoiser, scheduler, schedule)
        self.tiers, self.keep_all = tiers, keep_all
        self.paths = layer_paths(denoiser)
        self.loads: list[TierLoad] = []
        self.waits = 0
        self.held_bytes = 0  # tier weights and staging buffers held now
        self.peak_bytes = 0
        self._fixed = 0  # the denoiser's own tensors while streaming (biases, norms, embeddings)
        self._sampling = False
        self._lock = threading.Lock()
        self._queue: list[tuple[TierLayer, Precision, Future, int | None]] = []
        self._draining = False
        self._pool: ThreadPoolExecutor | None = None
        self._layers: dict[str, TierLayer] = {}
        self._originals: dict[str, nn.Module] = {}
        self._bytes: dict[Precision, int] = {}
        self._active: Precision | None = None
        self._current: int | None = None
        self._passes = 0

    def needs(self, step: int) -> set[Precision]:
        sp = self.schedule.steps[step]
        return {sp.precision} | ({sp.previous} if sp.previous is not None and sp.blend < 1 else set())

    def weight_bytes_at(self, p: Precision) -> int:
        if p not in self._bytes:
            self._bytes[p] = self.tiers.weight_bytes(p, [f"{k}.weight" for k in self.paths])
        return self._bytes[p]

    def resident_bytes(self) -> int:
        return self._fixed + self.held_bytes

    def resident(self) -> dict[Precision, int]:
        """How many layers hold each precision, once the loads requested so far are done."""
        held: Counter[Precision] = Counter()
        for layer in self._layers.values():
            for p, fut in layer.tiers.items():
                fut.result()
                held[p] += 1
        return dict(held)

    def _open(self) -> None:
        used = set().union(*(self.needs(i) for i in range(len(self.schedule))))
        self.tiers.check({f"{k}.weight": self.denoiser.get_submodule(k).weight for k in self.paths}, used)
        self._originals = {k: self.denoiser.get_submodule(k) for k in self.paths}
        self._layers = {k: TierLayer(k, m, self) for k, m in self._originals.items()}
        install(self.denoiser, self._layers)
        for m in self._originals.values():
            m.weight.data = torch.empty(0, dtype=m.weight.dtype)  # released; read back from the library on exit
        self._fixed, self.held_bytes, self.loads, self.waits = held_bytes(self.denoiser), 0, [], 0
        self.peak_bytes, self._sampling, self._current = self._fixed, True, None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=WORKER)
        try:
            for p in sorted(used if self.keep_all else self.needs(0)):
                self._load_now(list(self._layers.values()), p)
            for layer in self._layers.values():
                layer.ready_for = 0
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        self._sampling = False
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for layer in self._layers.values():
            for p in list(layer.tiers):
                self._drop(layer, p)
        install(self.denoiser, self._originals)
        if self._originals:
            exact = self.tiers.load(Precision.FP32, [f"{k}.weight" for k in self._originals])
            for k, m in self._originals.items():
                m.weight.data = exact[f"{k}.weight"].data
        self._layers, self._originals = {}, {}

    def _begin(self, step: int, module: nn.Module) -> None:
        if step != self._current:
            self._current = step
            level = _distinct(self.scheduler.timesteps)[step]
            calls = Counter(float(t) for t in self.scheduler.timesteps)[level]  # Heun: two per level but the first
            sp = self.schedule.steps[step]
            self._passes = calls * (2 if sp.previous is not None and sp.blend < 1 else 1)
            for layer in self._layers.values():
                if layer.ready_for != step:  # a layer that did not run all its passes of the step before
                    self._handover(layer, step, None)
                layer.passes = 0
        self._active = self.schedule.steps[step].precision

    def _run_at(self, p: Precision, module: nn.Module) -> None:
        self._active = p

    def _ran(self, layer: TierLayer) -> None:
        layer.passes += 1
        if layer.passes == self._passes:  # its last pass of this step: hand it over to the next
            self._handover(layer, (self._current + 1) % len(self.schedule), self._current)

    def _handover(self, layer: TierLayer, step: int, requested_in: int | None) -> None:
        layer.ready_for = step
        if self.keep_all:
            return
        want = self.needs(step)
        for p in [p for p in layer.tiers if p not in want]:
            self._drop(layer, p)
        for p in sorted(want - set(layer.tiers)):
            fut: Future[QuantizedTensor] = Future()
            layer.tiers[p] = fut
            with self._lock:
                self._queue.append((layer, p, fut, requested_in))
                start, self._draining = not self._draining, True
            if start:
                self._pool.submit(self._drain)

    def _drain(self) -> None:
        """On the worker: read every request gathered so far, one library read per precision."""
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._draining = False
                    return
            for p in sorted({p for _, p, _, _ in batch}):
                mine = [(layer, fut, asked) for layer, q, fut, asked in batch if q is p]
                self._fill([m[0] for m in mine], p, [m[1] for m in mine], mine[0][2])

    def _load_now(self, layers: list[TierLayer], p: Precision) -> None:
        futures: list[Future] = [Future() for _ in layers]
        for layer, fut in zip(layers, futures):
            layer.tiers[p] = fut
        self._fill(layers, p, futures, None)

    def _fill(self, layers: list[TierLayer], p: Precision, futures: list[Future], requested_in: int | None) -> None:
        start = time.perf_counter()
        try:
            got = self.tiers.load(p, [layer.weight_name for layer in layers], self._tally)
        except BaseException as e:  # the layer that needs it raises it, on the sampling thread
            for fut in futures:
                fut.set_exception(e)
            return
        self.loads.append(TierLoad(tuple(layer.path for layer in layers), p, requested_in, threading.current_thread().name, time.perf_counter() - start))
        for layer, fut in zip(layers, futures):
            fut.set_result(got[layer.weight_name])

    def _weight(self, layer: TierLayer) -> QuantizedTensor:
        p = self._active
        if p not in layer.tiers:  # never requested (a pass beyond those planned): read it now
            self._load_now([layer], p)
        elif not layer.tiers[p].done():
            self.waits += 1
        return layer.tiers[p].result()

    def _drop(self, layer: TierLayer, p: Precision) -> None:
        fut = layer.tiers.pop(p)
        if fut.exception() is None:  # waits for a load still running
            self._tally(-fut.result().nbytes)

    def _tally(self, n: int) -> None:
        with self._lock:
            self.held_bytes += n
            if self._sampling:
                self.peak_bytes = max(self.peak_bytes, self._fixed + self.held_bytes)
