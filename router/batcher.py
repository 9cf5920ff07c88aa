"""Request coalescing: concurrent compatible requests become one Predict.

Requests that agree on a ``BatchKey`` (model, version, signature, sorted
input names with their dtypes and non-batch dimensions, outputs) wait in one
bounded queue.  Dispatch follows free worker slots (DESIGN decision 3): the
queue's dispatcher holds at most one pending claim on a slot; while every
slot is busy, requests accumulate; when a slot frees, the queue head, up to
``max_batch_size`` rows, goes at once.  So low load pays no batching delay
and high load gets large batches.  ``batch_timeout_micros`` > 0 adds TF
Serving's wait for a fuller batch.

A batch is sent by the dispatcher (``router.dispatch``), on the slot its
queue claimed; a batch whose worker dies or drops the version under it is
sent once more elsewhere, and it keeps counting against the model's
``max_concurrent_batches`` until that resend is answered.

Guarantees: a request cancelled by its client or past its deadline while
queued is dropped before its batch forms and never computed; one bad request
never fails another (a batch the worker rejects with INVALID_ARGUMENT is
retried member by member); overload is refused at the queue with
RESOURCE_EXHAUSTED and a Retry-After hint, never absorbed in memory.

``BatchQueue`` is the formation policy (pure, clock passed in); ``Batcher``
is the mechanism.
"""

from __future__ import annotations

import asyncio
import functools
import math
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from protos import predict_pb2
from router.config import BatchingConfig
from shared.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, ServingError
from router.metrics import Metrics
from router.dispatch import Dispatcher, predict_call
from router.pool import Backend, Pool
from router.wire.concat import concat_into, pad_to, split_into

log = logging.getLogger("router.batcher")

FULL, SLOT_FREED, TIMEOUT = "full", "slot_freed", "timeout"

ALL_VERSIONS = -1  # a lane (model, ALL_VERSIONS): the model's batches of every version


@dataclass(frozen=True)
class BatchKey:
    model: str
    version: int
    signature: str
    inputs: tuple[tuple[str, int, tuple[int, ...]], ...]  # (name, dtype, dims after the first)
    outputs: tuple[str, ...]
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Looked up several times per request: hash the nested tuples once.
        object.__setattr__(self, "_hash", hash((self.model, self.version, self.signature, self.inputs, self.outputs)))

    def __hash__(self) -> int:
        return self._hash

    def lane(self, settings: BatchingConfig) -> tuple[str, int]:
        """The batches that share max_concurrent_batches: the model's, every version's
        together (a split's versions take turns); with share_wait_micros 0, each version's."""
        return (self.model, self.version) if settings.share_wait_micros == 0 else (self.model, ALL_VERSIONS)


@dataclass(eq=False)
class Pending:
    request: predict_pb2.PredictRequest
    rows: int
    deadline: float
    enqueued: float
    future: asyncio.Future[predict_pb2.PredictResponse] = field(repr=False)
    queued: bool = True  # still counted in its queue's rows


class BatchQueue:
    """Which requests form the next batch, and when (pure; the caller passes ``now``)."""

    def __init__(self, settings: BatchingConfig) -> None:
        self.settings = settings
        self.items: deque[Pending] = deque()
        self.rows = 0

    def add(self, item: Pending) -> None:
        if self.rows + item.rows > self.settings.max_enqueued:
            raise ResourceExhausted(
                f"batch queue is full ({self.rows} rows waiting, max_enqueued "
                f"{self.settings.max_enqueued})", retry_after=1.0)
        self.items.append(item)
        self.rows += item.rows

    def forget(self, item: Pending) -> None:
        """A request that left the queue (batched, cancelled, expired) stops counting."""
        if item.queued:
            item.queued = False
            self.rows -= item.rows

    def expire(self, now: float) -> list[Pending]:
        """Drop finished or expired requests; returns the expired ones."""
        expired = []
        kept: deque[Pending] = deque()
        for item in self.items:
            if item.future.done() or item.deadline <= now:
                self.forget(item)
                if not item.future.done():
                    expired.append(item)
                continue
            kept.append(item)
        self.items = kept
        return expired

    def wait(self, now: float) -> float:
        """Seconds until the head should go (0: now) when a slot is free."""
        timeout = self.settings.batch_timeout_micros / 1e6
        if not self.items or timeout <= 0 or self.live_rows() >= self.settings.max_batch_size:
            return 0.0
        return max(0.0, self.items[0].enqueued + timeout - now)

    def live_rows(self) -> int:
        return sum(i.rows for i in self.items if not i.future.done())

    def take(self, now: float) -> tuple[list[Pending], str]:
        """The next batch: queue head up to max_batch_size rows, and why it left."""
        limit = self.settings.max_batch_size
        batch: list[Pending] = []
        rows = 0
        while self.items:
            item = self.items[0]
            if item.future.done():
                self.forget(self.items.popleft())
                continue
            if batch and rows + item.rows > limit:
                break
            self.forget(self.items.popleft())
            batch.append(item)
            rows += item.rows
        if rows >= limit or (self.items and not self.items[0].future.done()):
            trigger = FULL
        elif self.settings.batch_timeout_micros > 0 and batch:
            trigger = TIMEOUT if now - batch[0].enqueued >= self.settings.batch_timeout_micros / 1e6 else SLOT_FREED
        else:
            trigger = SLOT_FREED
        return batch, trigger


class Batcher:
    def __init__(self, pool: Pool, dispatcher: Dispatcher, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.dispatcher = dispatcher
        self.metrics = metrics
        self._clock = clock
        self._queues: dict[BatchKey, BatchQueue] = {}
        self._wakeups: dict[BatchKey, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runners: dict[BatchKey, asyncio.Task[None]] = {}
        # Per (model, version): batches formed by its queues now in flight, and
        # an event set whenever one of them finishes (max_concurrent_batches).
        # Per version, so a slow canary cannot hold the stable version's batches back.
        # lane -> (when it went out, its version) for each of its batches in flight
        self._sent: dict[tuple[str, int], list[tuple[float, int]]] = {}
        # lane -> version -> when the oldest request of its queue came, while it waits its turn
        self._turns: dict[tuple[str, int], dict[int, float]] = {}
        self._batch_done: dict[tuple[str, int], asyncio.Event] = {}

    def queued_rows(self, model: str) -> int:
        return sum(q.rows for k, q in self._queues.items() if k.model == model)

    async def submit(self, key: BatchKey, settings: BatchingConfig, request: predict_pb2.PredictRequest,
                     rows: int, deadline: float) -> predict_pb2.PredictResponse:
        queue = self._queues.get(key)
        if queue is None or (queue.settings is not settings and not queue.items and key not in self._runners):
            # New, or the model's batching was reconfigured (and the old queue is idle).
            queue = self._new_queue(key, settings)
        loop = asyncio.get_running_loop()
        now = self._clock()
        future: asyncio.Future[predict_pb2.PredictResponse] = loop.create_future()
        item = Pending(request, rows, deadline, now, future)
        if (not queue.items and key not in self._runners
                and not self._room(lane := key.lane(settings), settings, now, key.version, now)):
            # Nothing waits and a slot is free: go at once, from this task (no
            # dispatcher hop), so low load pays nothing for batching.
            backend = self.pool.try_acquire(key.model, key.version, limit=settings.max_inflight_batches)
            if backend is not None:
                item.queued = False
                sent = self._claim(lane, key.version)
                await self._execute(key, settings, [item], SLOT_FREED, backend, lane, sent)
                return await future
        try:
            queue.add(item)
        except ResourceExhausted:
            self.metrics.shed(key.model, "queue_full")
            raise
        future.add_done_callback(functools.partial(_left_queue, queue, item))
        # The deadline is a timer on the item's own future; a client that goes
        # away cancels the future through the awaiting task.  Either way the
        # request is done, and batch formation skips it: never computed.
        timer = loop.call_later(max(0.0, deadline - now), _expire, future)
        self._wakeups[key].set()
        if key not in self._runners:
            self._runners[key] = loop.create_task(self._run(key, queue), name=f"batch-{key.model}")
        try:
            return await future
        finally:
            timer.cancel()

    def _new_queue(self, key: BatchKey, settings: BatchingConfig) -> BatchQueue:
        queue = self._queues[key] = BatchQueue(settings)
        self._wakeups[key] = asyncio.Event()
        model = key.model
        self._batch_done.setdefault(key.lane(settings), asyncio.Event())
        self.metrics.track_queue_depth(model, lambda: self.queued_rows(model))
        return queue

    async def _run(self, key: BatchKey, queue: BatchQueue) -> None:
        """The queue's dispatcher: one slot claim at a time, the head goes when it is granted."""
        wakeup = self._wakeups[key]
        try:
            while True:
                now = self._clock()
                for item in queue.expire(now):
                    item.future.set_exception(DeadlineExceeded("deadline exceeded while waiting in the batch queue"))
                if not queue.items:
                    wakeup.clear()
                    break
                delay = queue.wait(now)
                if delay > 0:
                    wakeup.clear()
                    try:
                        await asyncio.wait_for(wakeup.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                    continue
                lane = key.lane(queue.settings)
                wait = self._room(lane, queue.settings, now, key.version, queue.items[0].enqueued)
                turns = self._turns.setdefault(lane, {})
                if wait > 0:
                    if self._own(lane, key.version) < queue.settings.max_concurrent_batches:
                        # Held back by other versions' batches: its turn comes before younger requests'.
                        turns[key.version] = queue.items[0].enqueued
                    else:  # by its own batches in flight: nobody waits for it
                        self._give_turn(lane, key.version)
                    # As many of the model's batches in flight as allowed: the next
                    # one forms when one of them is done, or once one of another
                    # version has run share_wait_micros (a slow version holds the
                    # others back by no more).  Queued requests still expire on
                    # their own timers meanwhile.
                    done = self._batch_done[lane]
                    done.clear()
                    if wait == math.inf:
                        await done.wait()
                    else:
                        try:
                            await asyncio.wait_for(done.wait(), wait)
                        except asyncio.TimeoutError:
                            pass
                    continue
                self._give_turn(lane, key.version)
                latest = max(i.deadline for i in queue.items)
                try:
                    backend = await self.pool.acquire(key.model, key.version, latest,
                                                      limit=queue.settings.max_inflight_batches)
                except DeadlineExceeded:
                    continue  # the requests it waited for expired; later ones wait afresh
                except ServingError as exc:
                    # No worker can take this version (or every request expired): fail the waiters.
                    for item in list(queue.items):
                        if not item.future.done():
                            item.future.set_exception(exc)
                    queue.items.clear()
                    continue
                head = queue.items[0].enqueued if queue.items else now
                if self._room(lane, queue.settings, self._clock(), key.version, head):
                    # Another queue of the version sent a batch while this one waited for a slot.
                    self.pool.release(backend, key.model)
                    continue
                batch, trigger = queue.take(self._clock())
                if not batch:
                    self.pool.release(backend, key.model)
                    continue
                sent = self._claim(lane, key.version)
                task = asyncio.get_running_loop().create_task(
                    self._execute(key, queue.settings, batch, trigger, backend, lane, sent))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            # No await between the empty check and here, so no submit can slip in unseen.
            del self._runners[key]
            self._give_turn(key.lane(queue.settings), key.version)

    async def _execute(self, key: BatchKey, settings: BatchingConfig, batch: list[Pending], trigger: str,
                       backend: Backend, lane: tuple[str, int], sent: tuple[float, int]) -> None:
        now = self._clock()
        total = sum(item.rows for item in batch)
        padded = pad_to(total, settings.allowed_batch_sizes)
        self.metrics.observe_batch(key.model, total, len(batch), padded - total, trigger,
                                   [now - item.enqueued for item in batch])
        isolate = False
        try:
            try:
                request = self._assemble(key, batch, settings)
            except BaseException:
                self.pool.release(backend, key.model)
                raise
            # On the slot already taken; the dispatcher gives it back, and resends the batch
            # once elsewhere if the worker dies or drops the version under it.
            response = await self.dispatcher.send(key.model, key.version, predict_call(request),
                                                  max(item.deadline for item in batch), backend=backend)
            self._deliver(batch, response)
        except InvalidArgument as exc:
            if len(batch) == 1:
                _fail(batch, exc)
            else:
                isolate = True
        except ServingError as exc:
            _fail(batch, exc)
        except Exception as exc:  # never leave members waiting out their deadlines
            log.exception("batch of %s failed unexpectedly", key.model)
            _fail(batch, Internal(f"{type(exc).__name__}: {exc}"))
        finally:
            self._sent[lane].remove(sent)
            self._batch_done[lane].set()
        if isolate:
            # One bad request must not fail the others: each member alone.
            self.metrics.retried(key.model, "batch_invalid_argument")
            await asyncio.gather(*(self._send(key, settings, item) for item in batch))

    def _room(self, lane: tuple[str, int], settings: BatchingConfig, now: float, version: int,
              since: float) -> float:
        """0 when another batch of ``version`` (whose oldest request came at ``since``) may go
        out under max_concurrent_batches; else how long until one may (math.inf: when one of
        the lane's is done).  Versions take turns: one whose requests waited longer goes
        first.  Another version's batch in flight for share_wait_micros or longer no longer
        counts: a slow version does not hold the others back for longer."""
        cap = settings.max_concurrent_batches
        if not cap:
            return 0.0
        sent = self._sent.get(lane, ())
        waiting = self._turns.get(lane)
        older = sum(1 for v, t in waiting.items() if v != version and t < since) if waiting else 0
        if len(sent) + older < cap:
            return 0.0
        own = self._own(lane, version)
        if own >= cap or not settings.share_wait_micros:
            return math.inf
        share_wait = settings.share_wait_micros / 1e6
        others = sorted(t for t, v in sent if v != version and now - t < share_wait)
        if own + len(others) + older < cap:
            return 0.0
        if own + older >= cap:
            # Its elders' turns first: they go when they can, and say so (_give_turn); a
            # turn that cannot be taken (no worker for it yet) delays others this long at most.
            return share_wait
        return others[own + len(others) + older - cap] + share_wait - now  # when enough have run that long

    def _give_turn(self, lane: tuple[str, int], version: int) -> None:
        """``version`` no longer waits its turn: the versions waiting behind it look again."""
        turns = self._turns.get(lane)
        if turns is not None and turns.pop(version, None) is not None:
            self._batch_done[lane].set()

    def _own(self, lane: tuple[str, int], version: int) -> int:
        """Batches of ``version`` in flight."""
        return sum(1 for _, v in self._sent.get(lane, ()) if v == version)

    def _claim(self, lane: tuple[str, int], version: int) -> tuple[float, int]:
        """Count a batch that is about to be sent (``_execute`` gives it back)."""
        sent = (self._clock(), version)
        self._sent.setdefault(lane, []).append(sent)  # its event exists: see _new_queue
        return sent

    def _assemble(self, key: BatchKey, batch: list[Pending], settings: BatchingConfig) -> predict_pb2.PredictRequest:
        total = sum(item.rows for item in batch)
        pad_rows = pad_to(total, settings.allowed_batch_sizes) - total
        first = batch[0].request
        if len(batch) == 1 and pad_rows == 0:
            return first
        request = predict_pb2.PredictRequest()
        request.model_spec.CopyFrom(first.model_spec)
        request.output_filter.extend(first.output_filter)
        rows = [item.rows for item in batch]
        inputs = request.inputs
        for name, dtype, inner in key.inputs:
            concat_into(inputs[name], [item.request.inputs[name] for item in batch], rows, dtype, inner, pad_rows)
        return request

    def _deliver(self, batch: list[Pending], response: predict_pb2.PredictResponse) -> None:
        if len(batch) == 1 and all(
            t.tensor_shape.dim and t.tensor_shape.dim[0].size == batch[0].rows for t in response.outputs.values()
        ):
            if not batch[0].future.done():
                batch[0].future.set_result(response)  # alone and unpadded: the answer as it came
            return
        rows = [item.rows for item in batch]
        outs = [predict_pb2.PredictResponse() for _ in batch]
        for out in outs:
            out.model_spec.CopyFrom(response.model_spec)
        for name, tensor in response.outputs.items():
            split_into(tensor, rows, [out.outputs[name] for out in outs])
        for item, out in zip(batch, outs):
            if not item.future.done():
                item.future.set_result(out)

    async def _send(self, key: BatchKey, settings: BatchingConfig, item: Pending) -> None:
        """One member of a rejected batch, alone, through the dispatcher (with its retry)."""
        if item.future.done():
            return
        try:
            request = self._assemble(key, [item], settings)
            response = await self.dispatcher.send(key.model, key.version, predict_call(request), item.deadline)
            self._deliver([item], response)
        except ServingError as exc:
            _fail([item], exc)
        except Exception as exc:
            log.exception("sending a request of %s alone failed unexpectedly", key.model)
            _fail([item], Internal(f"{type(exc).__name__}: {exc}"))

    async def close(self) -> None:
        for task in [*self._runners.values(), *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._runners.values(), *self._tasks, return_exceptions=True)


def _left_queue(queue: BatchQueue, item: Pending, _: object) -> None:
    queue.forget(item)


def _expire(future: asyncio.Future[predict_pb2.PredictResponse]) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("deadline exceeded while waiting in the batch queue"))


def _fail(batch: list[Pending], exc: ServingError) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)
