"""The Celery app: queues, routing, reliability settings, and publishing job ids."""

from __future__ import annotations

import base64
import functools
import json
import logging
import ssl
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from service.errors import BrokerError
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: The task every message names; its only argument is a job id.
TASK_NAME = "lrq.run_job"
QUEUES = ("cpu", "gpu")
#: How often a worker on the filesystem broker looks for new messages.
FILESYSTEM_POLL_SECONDS = 0.05


def mask_broker_url(url: str) -> str:
    """The broker URL with its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _verified_tls_url(url: str) -> str:
    """A rediss:// URL without TLS options in its query, refusing any that weaken them.

    Kombu lets ``ssl_*`` query options replace broker_use_ssl whole, so ``ssl_cert_reqs=none``
    would switch verification off (and ``required`` would drop the CA file).
    """
    parts = urlsplit(url)
    kept = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.startswith("ssl_"):
            if key == "ssl_cert_reqs" and value.lower() in ("required", "cert_required"):
                continue
            raise BrokerError(
                f"LRQ_BROKER_URL: {key}={value} is not allowed: the broker's certificate is "
                "always verified (set LRQ_BROKER_CA_FILE for a private CA)"
            )
        kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept)))


def make_app(settings: Settings) -> Celery:
    """A Celery app for these settings; JSON only, late acks, one message at a time."""
    url = settings.resolved_broker_url()
    if url.startswith("rediss://"):
        url = _verified_tls_url(url)
    app = Celery("lrq", broker=url, set_as_current=False)
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    # Transports that drop a message they cannot read rather than dying on it (a path, so the
    # module is imported only when a connection is made).
    broker_transport: str | None = None
    if url.startswith("filesystem://"):
        folder = settings.broker_folder()
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # kombu polls the folder once a second by default: a sweep of small jobs would
            # then run one job a second however many workers there are.
            "polling_interval": FILESYSTEM_POLL_SECONDS,
        }
        broker_transport = "service.transport:FilesystemTransport"
    elif url.startswith("redis"):
        secure = url.startswith("rediss://")
        broker_transport = f"service.transport:{'Secure' if secure else ''}RedisTransport"
        transport.update(
            socket_connect_timeout=settings.broker_timeout,
            socket_timeout=max(settings.broker_timeout, 30.0),
            retry_on_timeout=True,
            health_check_interval=15,
        )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_queues=[Queue(name, routing_key=name) for name in QUEUES],
        task_default_queue="cpu",
        task_create_missing_queues=True,
        # At-least-once: a message is acked after the task ran, and requeued if its
        # process died; the database makes a second delivery harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.time_limit,
        broker_transport=broker_transport,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_connection_timeout=settings.broker_timeout,
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
    )
    if url.startswith("rediss://"):
        # Verify the server against the system's CAs (or the given file); never fall back.
        ssl_options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        if settings.broker_ca_file:
            ssl_options["ssl_ca_certs"] = settings.broker_ca_file
        app.conf.broker_use_ssl = ssl_options
    return app


@functools.cache
def get_app() -> Celery:
    """The process's app, made from the settings once."""
    return make_app(get_settings())


#: Messages per Redis pipeline when a sweep is published (kombu's batch limit).
PUBLISH_BATCH = 1000


def publish(app: Celery, jobs: Sequence[tuple[str, str]], *, timeout: float) -> None:
    """Send one message per (job id, queue), on Redis in one pipeline; BrokerError if the
    broker is out of reach (the jobs then stay recorded for the reconciler)."""
    if not jobs:
        return
    policy = {
        "max_retries": 2,
        "interval_start": 0,
        "interval_step": timeout / 4,
        "interval_max": timeout / 2,
    }
    # Kombu batches only where a pipeline is never replayed on a timeout; a replayed
    # message would merely be a duplicate here (the database fences it), but this
    # connection publishes without replay so the whole sweep is one round trip.
    options = {"retry_on_timeout": False}
    try:
        with app.connection_for_write(transport_options=options) as connection:
            connection.ensure_connection(max_retries=1)
            producer = app.amqp.Producer(connection)
            for queue in dict.fromkeys(queue for _, queue in jobs):
                # Declared every time: a flushed Redis loses its bindings, and a
                # message sent without one is dropped.
                Queue(queue, routing_key=queue)(producer.channel).declare()
            with producer.batch(max_size=PUBLISH_BATCH):
                for job_id, queue in jobs:
                    app.send_task(
                        TASK_NAME,
                        args=[job_id],
                        task_id=job_id,  # Celery's log and Flower name the job, not a uuid
                        queue=queue,
                        routing_key=queue,
                        producer=producer,
                        retry=True,
                        retry_policy=policy,
                    )
    except Exception as exc:
        url = mask_broker_url(app.conf.broker_url or "")
        raise BrokerError(f"broker {url} unreachable: {type(exc).__name__}: {exc}") from None


def _redis_client(app: Celery) -> Any:
    import redis

    url = app.conf.broker_url
    options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 10}
    if url.startswith("rediss://"):
        ssl_conf = app.conf.broker_use_ssl or {}
        options["ssl_cert_reqs"] = "required"
        if ssl_conf.get("ssl_ca_certs"):
            options["ssl_ca_certs"] = ssl_conf["ssl_ca_certs"]
    return redis.Redis.from_url(url, **options)


def _job_id_of(raw: bytes | str) -> str | None:
    """The job id a stored message carries; None for anything else, however malformed."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # the unacked hash stores [message, exchange, key]
            message = message[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0])
    except Exception:  # foreign or malformed: not a message of ours, so it holds no job
        return None


def held_job_ids(
    app: Celery, queues: Iterable[str] = QUEUES, *, stale_after: float = 120.0
) -> set[str] | None:
    """Job ids the broker holds: waiting in a queue, or delivered and unacked for less than
    ``stale_after`` seconds (older ones may sit with a dead worker until the visibility
    timeout, so they count as lost; a duplicate message is harmless). None when the broker
    cannot tell."""
    if not str(app.conf.broker_url).startswith(("redis://", "rediss://")):
        return None
    client = _redis_client(app)
    held: set[str] = set()
    keys = list(queues)
    # Kombu keeps priority sub-queues beside each list; read them all.
    for queue in queues:
        keys.extend(k.decode() for k in client.scan_iter(match=f"{queue}\x06\x16*"))
    for key in keys:
        if client.type(key) not in (b"list", b"none"):
            continue  # not a queue kombu wrote
        for raw in client.lrange(key, 0, -1):
            job_id = _job_id_of(raw)
            if job_id:
                held.add(job_id)
    fresh = time.time() - stale_after
    delivered = dict(client.zrange("unacked_index", 0, -1, withscores=True))
    for tag, raw in client.hgetall("unacked").items():
        job_id = _job_id_of(raw)
        if job_id and delivered.get(tag, 0.0) >= fresh:
            held.add(job_id)
    return held


def queue_lengths(app: Celery, queues: Iterable[str] = QUEUES) -> dict[str, int | None]:
    """Messages waiting per queue (None where the broker cannot say)."""
    if str(app.conf.broker_url).startswith(("redis://", "rediss://")):
        # An empty Redis list does not exist: a passive declare cannot tell it from a missing one.
        client = _redis_client(app)
        return {
            name: sum(
                client.llen(key) for key in [name, *client.scan_iter(match=f"{name}\x06\x16*")]
            )
            for name in queues
        }
    out: dict[str, int | None] = {}
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for name in queues:
            try:
                out[name] = channel.queue_declare(name, passive=True).message_count
            except Exception:
                out[name] = None
    return out


def live_workers(app: Celery, timeout: float = 1.0) -> list[str]:
    """Names of workers that answer a ping."""
    try:
        replies = app.control.inspect(timeout=timeout).ping() or {}
    except Exception:
        return []
    return sorted(replies)
