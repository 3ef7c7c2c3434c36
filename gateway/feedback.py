"""Feedback on requests: `POST /turnout/feedback` {request_id, metric, value, comment?}.

Metrics are declared per route (`routes.<r>.feedback`: name, type bool|float,
higher_is_better). Records are immutable once written, so feedback is kept beside them: in
memory (the newest `capacity` requests), or with Redis in a hash `{prefix}feedback:{id}`
(field: metric, value: JSON {value, comment, at}) expiring with the record lookups
(`records.lookup_ttl_s`). Posting a metric again replaces its value.

Who may post: the key that made the request, or the admin key (anyone on an open gateway).
Another key gets 404, as for an unknown request, so request ids do not leak between keys.
Each entry keeps the key its request belongs to (`owner`): a request id a client chose
(`x-request-id`) may be chosen again by another key, whose request then answers to the id;
the notes made on the first key's request are neither shown to it nor replaced by it (404).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.admin import parse
from gateway.auth import check_admin
from gateway.errors import BadRequest, Forbidden, NotFound, ServiceUnavailable
from gateway.gateway import Gateway
from gateway.records import RequestRecord
from gateway.settings import Route

log = logging.getLogger("turnout")
MAX_COMMENT = 2_000  # characters
BATCH = 500  # feedback hashes read per Redis round trip for a report
READ_TIMEOUT_S = 5.0  # per batch


class FeedbackBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    metric: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    value: bool | float
    comment: Annotated[str, msgspec.Meta(max_length=MAX_COMMENT)] | None = None


class Entry(msgspec.Struct, kw_only=True, omit_defaults=True):
    value: bool | float
    at: float  # unix seconds when posted
    comment: str | None = None
    owner: str | None = None  # the name of the key whose request it is on (never shown)


_decode_entry = msgspec.json.Decoder(Entry).decode


class FeedbackStore:
    """Feedback by request id: in Redis when a client is given, else in a bounded dict."""

    def __init__(
        self,
        redis: Redis | None,
        prefix: str = "turnout:",
        capacity: int = 100_000,
        ttl_s: int = 86_400,
    ) -> None:
        self._redis, self._prefix, self._ttl = redis, f"{prefix}feedback:", ttl_s
        self._capacity = capacity
        self._memory: OrderedDict[str, dict[str, Entry]] = OrderedDict()

    async def get(self, request_id: str) -> dict[str, Entry]:
        if self._redis is None:
            return dict(self._memory.get(request_id, {}))
        try:
            fields: dict[bytes, bytes] = await self._redis.hgetall(self._prefix + request_id)  # type: ignore[misc]
        except RedisError:
            raise ServiceUnavailable("The feedback store is unavailable.") from None
        found: dict[str, Entry] = {}
        for name, data in fields.items():
            try:
                found[name.decode()] = _decode_entry(data)
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue  # written by an incompatible version: skipped
        return found

    async def get_many(self, ids: Sequence[str]) -> dict[str, dict[str, bool | float]]:
        """The values posted on each of `ids` that has any (one round trip per 500 ids)."""
        if self._redis is None:
            found = ((i, self._memory.get(i)) for i in ids)
            return {i: {m: e.value for m, e in notes.items()} for i, notes in found if notes}
        values: dict[str, dict[str, bool | float]] = {}
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for request_id in chunk:
                            pipe.hgetall(self._prefix + request_id)
                        answers: list[dict[bytes, bytes]] = await pipe.execute()
            except (RedisError, TimeoutError):
                raise ServiceUnavailable("The feedback store is unavailable.") from None
            for request_id, fields in zip(chunk, answers, strict=True):
                notes = {}
                for name, data in fields.items():
                    try:
                        notes[name.decode()] = _decode_entry(data).value
                    except (msgspec.DecodeError, UnicodeDecodeError):
                        continue  # written by an incompatible version: skipped
                if notes:
                    values[request_id] = notes
        return values

    async def put(
        self,
        request_id: str,
        metric: str,
        value: bool | float,
        comment: str | None,
        owner: str | None = None,
    ) -> None:
        entry = Entry(value=value, at=time.time(), comment=comment, owner=owner)
        if self._redis is None:
            self._memory.setdefault(request_id, {})[metric] = entry
            self._memory.move_to_end(request_id)
            while len(self._memory) > self._capacity:
                self._memory.popitem(last=False)
            return
        key = self._prefix + request_id
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, metric, msgspec.json.encode(entry).decode())
                pipe.expire(key, self._ttl)
                await pipe.execute()
        except RedisError:
            raise ServiceUnavailable("The feedback store is unavailable.") from None


_stores: weakref.WeakKeyDictionary[Gateway, FeedbackStore] = weakref.WeakKeyDictionary()


def store_of(gw: Gateway) -> FeedbackStore:
    """The gateway's feedback store, made on first use (after `start()` connected Redis)."""
    store = _stores.get(gw)
    if store is None:
        settings = gw.settings
        store = FeedbackStore(
            gw.redis, settings.state.key_prefix, settings.records.capacity,
            settings.records.lookup_ttl_s,
        )  # fmt: skip
        _stores[gw] = store
    return store


async def post_feedback(gw: Gateway, authorization: str | None, raw: bytes) -> dict[str, Any]:
    """Check caller, request, metric and value (in that order); store; return all feedback."""
    admin = _is_admin(authorization, gw.admin_key)
    key = None if admin else await gw.keys.authenticate(authorization)
    body = parse(raw, FeedbackBody)
    record = await gw.records.get(body.request_id)
    if record is None or not (admin or key is None or record.key == key.name):
        raise NotFound(f"No record for request `{body.request_id}`.", param="request_id")
    _check_value(gw, record, body)
    store = store_of(gw)
    if any(entry.owner != record.key for entry in (await store.get(body.request_id)).values()):
        # Notes on another key's request that had the same id: not this caller's to see.
        raise NotFound(f"No record for request `{body.request_id}`.", param="request_id")
    await store.put(body.request_id, body.metric, body.value, body.comment, record.key)
    return {"request_id": body.request_id, "feedback": _builtins(await store.get(body.request_id))}


async def feedback_of(gw: Gateway, record: RequestRecord) -> dict[str, Any]:
    """A request's feedback as JSON-ready {metric: {value, at, comment?}}, for its record.

    Empty, without asking the store, when the route declares no metrics; empty (logged) when
    the store is unavailable: the record itself is still worth answering with."""
    route = gw.settings.routes.get(record.route)
    if route is None or not route.feedback:
        return {}
    try:
        notes = await store_of(gw).get(record.request_id)
        return _builtins({name: e for name, e in notes.items() if e.owner == record.key})
    except ServiceUnavailable:
        log.warning("feedback: Redis read failed; record %s shown without it", record.request_id)
        return {}


async def for_report(
    gw: Gateway, records: Sequence[RequestRecord], routes: Mapping[str, Route]
) -> dict[str, dict[str, bool | float]] | None:
    """The feedback values of the primary requests of the routes that declare metrics; None
    (logged) when the store cannot be read: the report is still worth answering with."""
    wanted = {name for name, route in routes.items() if route.feedback}
    ids = [
        r.request_id for r in records if r.route in wanted and r.shadow_of is None and not r.forced
    ]
    if not ids:
        return {}
    try:
        return await store_of(gw).get_many(ids)
    except ServiceUnavailable:
        log.warning("feedback: Redis read failed; the report is made without feedback")
        return None


def _builtins(feedback: dict[str, Entry]) -> dict[str, Any]:
    shown = ((name, msgspec.structs.replace(e, owner=None)) for name, e in feedback.items())
    return {name: msgspec.to_builtins(entry) for name, entry in sorted(shown)}


def _is_admin(authorization: str | None, admin_key: str | None) -> bool:
    try:
        check_admin(authorization, admin_key)
    except Forbidden:
        return False
    return True


def _check_value(gw: Gateway, record: RequestRecord, body: FeedbackBody) -> None:
    route = gw.settings.routes.get(record.route)
    declared = {m.name: m for m in route.feedback} if route is not None else {}
    metric = declared.get(body.metric)
    if metric is None:
        names = ", ".join(sorted(declared)) or "none"
        raise BadRequest(
            f"Metric `{body.metric}` is not declared on route `{record.route}`"
            f" (declared: {names}).",
            param="metric",
        )
    if metric.type == "bool" and not isinstance(body.value, bool):
        raise BadRequest(f"Metric `{metric.name}` takes true or false.", param="value")
    if metric.type == "float" and (isinstance(body.value, bool) or not math.isfinite(body.value)):
        raise BadRequest(f"Metric `{metric.name}` takes a finite number.", param="value")
