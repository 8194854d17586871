"""Broker transports that discard a message they cannot read instead of dying on it.

Kombu decodes a message inside the worker's event loop: a body that is not base64, a
``properties`` that is not a dict, bytes that are not JSON, or a header Celery chokes on raise
out of the loop and end the worker ("Unrecoverable error"), and a message already counted as
delivered is put back on the queue for the next worker to die on. These channels check each
message before kombu builds it, log a message they cannot use once, and drop it. No job is lost
by dropping: the database is the record of work, and the reconciler republishes any queued job
the broker does not hold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from queue import Empty
from typing import Any

import redis as redis_py
from kombu.transport import filesystem, redis

log = logging.getLogger(__name__)

#: How much of a discarded message the log shows.
SHOWN_CHARS = 200


def _shown(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}..."


def discard(queue: str, raw: Any, reason: str) -> None:
    """Log a message that is dropped, once, with its queue and the reason."""
    log.error("discarded an unreadable message on queue %r (%s): %s", queue, reason, _shown(raw))


def message_problem(raw: Any) -> str | None:
    """Why kombu could not build a message from ``raw`` (a decoded JSON value), or None."""
    if not isinstance(raw, dict):
        return f"not a JSON object but {type(raw).__name__}"
    properties = raw.get("properties")
    if not isinstance(properties, dict):
        return f"properties is {type(properties).__name__}, not an object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "properties.delivery_tag is not a string"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "properties.delivery_info is not an object"
    if not isinstance(raw.get("body"), str):
        return f"body is {type(raw.get('body')).__name__}, not a string"
    if not isinstance(raw.get("headers") or {}, dict):
        return "headers is not an object"
    return None


class _GuardedChannel:
    """Consumes through a callback that builds each message defensively."""

    connection: Any
    qos: Any
    Message: Callable[..., Any]

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Callable[[Any], Any], consumer_tag: str, **kw: Any
    ) -> Any:
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kw)  # type: ignore[misc]
        self.connection._callbacks[queue] = self._guarded(queue, no_ack, callback)
        return result

    def _guarded(
        self, queue: str, no_ack: bool, callback: Callable[[Any], Any]
    ) -> Callable[[Any], Any]:
        def deliver(raw: Any) -> Any:
            problem = message_problem(raw)
            if problem is None:
                try:
                    message = self.Message(raw, channel=self)
                except Exception as exc:
                    problem = f"cannot decode: {type(exc).__name__}: {exc}"
            if problem is not None:
                discard(queue, raw, problem)
                return None
            if not no_ack:
                self.qos.append(message, message.delivery_tag)
            try:
                return callback(message)
            except self.connection.connection_errors:
                raise
            except Exception as exc:
                # Celery raises for some headers and bodies it cannot use; without this the
                # error ends the worker and the unacked message goes back on the queue.
                discard(queue, raw, f"rejected by the consumer: {type(exc).__name__}: {exc}")
                if not no_ack and not message.acknowledged:
                    message.reject(requeue=False)
                return None

        return deliver


class RedisQoS(redis.QoS):  # type: ignore[misc]
    """Redis ack emulation that drops an unacked entry it cannot read instead of restoring it."""

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> Any:
        try:
            return super().restore_by_tag(tag, client=client, leftmost=leftmost)  # type: ignore[no-untyped-call]
        except (ValueError, TypeError) as exc:
            discard("unacked", tag, f"cannot restore: {type(exc).__name__}: {exc}")
            self._remove_from_indices(tag).execute()  # type: ignore[no-untyped-call]
            return None


class RedisChannel(_GuardedChannel, redis.Channel):  # type: ignore[misc]
    """A Redis channel that drops messages it cannot read."""

    QoS = RedisQoS

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            # Not UTF-8 or not JSON; BRPOP has already taken it off the list.
            discard("?", "(raw bytes)", f"not a JSON message: {exc}")
            raise Empty() from None

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            # A channel of a connection closed during a reconnect, still reached by a timer
            # (the unacked-restore sweep) or a late ack: a connection error, which kombu and
            # Celery handle, rather than an AttributeError that ends the worker.
            raise redis_py.ConnectionError("the broker connection of this channel is closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]


class RedisTransport(redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with RedisChannel."""

    Channel = RedisChannel


class FilesystemChannel(_GuardedChannel, filesystem.Channel):  # type: ignore[misc]
    """A filesystem channel that drops message files it cannot read."""

    def _get(self, queue: str, timeout: Any = None) -> Any:
        try:
            return super()._get(queue)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            # The file was already moved out of the queue folder and removed.
            discard(queue, "(file)", f"not a JSON message: {exc}")
            raise Empty() from None


class FilesystemTransport(filesystem.Transport):  # type: ignore[misc]
    """kombu's filesystem transport with FilesystemChannel."""

    Channel = FilesystemChannel
