"""Amazon SQS (``sqs://QUEUE-NAME`` or the queue's https URL), through boto3.

* receive: long polling (``WaitTimeSeconds``: the timeout rounded up to whole seconds,
  at most SQS's 20; 0 is a short poll), at most 10 messages a call (SQS's limit).
  delivery_count is ``ApproximateReceiveCount``; lag is ``ApproximateNumberOfMessages``.
* ack: ``DeleteMessage`` (after the commit); a batch's acks: ``DeleteMessageBatch``,
  ten a request (SQS's limit), its failed entries counted and logged one by one.
* nak(delay): ``ChangeMessageVisibility`` to ``delay`` (whole seconds, rounded up): the
  message becomes visible again then.
* extend(seconds): ``ChangeMessageVisibility`` to ``seconds`` from now (SQS refuses to
  hide a message more than 12 hours after it was received).
* term(reason): with a redrive policy on the queue (its ``RedrivePolicy`` attribute)
  the message is left to it: made visible at once and, each time this source receives
  it again, hidden again without being handed out, until its receive count passes
  ``maxReceiveCount`` and SQS moves it to the dead-letter queue. The reason goes to
  the log (SQS keeps none with a moved message). Without a redrive policy there is no
  dead-letter queue: the message is deleted and the reason logged as a warning.
* the lease is the queue's ``VisibilityTimeout`` (the broker's setting, not ours).

The region and credentials come from boto3's usual configuration (AWS_DEFAULT_REGION, AWS_PROFILE,
instance roles...), or the region from the queue URL. ``AWS_ENDPOINT_URL_SQS`` points it
at another SQS implementation; the tests use moto's emulator that way.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from optimizr.brokers.base import (
    BrokerMessage,
    BrokerOptions,
    BrokerStatistics,
    Counters,
    EventSource,
    Message,
    ack_together,
    own,
)
from optimizr.brokers.urls import SqsTarget
from optimizr.errors import UsageError

_log = logging.getLogger("optimizr.brokers")

MAX_WAIT = 20  # seconds: SQS's longest long poll
MAX_BATCH = 10  # messages: SQS's most per ReceiveMessage
MAX_VISIBILITY = 43_200  # seconds: 12 hours, SQS's longest
LAG_EVERY = 2.0  # seconds between two ApproximateNumberOfMessages requests
# Termed messages remembered (by MessageId) so that they are not handed out again while
# the redrive policy takes them to the DLQ; the oldest are forgotten first.
TERMED_MEMORY = 10_000
_ERRORS = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)
_NO_QUEUE = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")


class SqsSource(EventSource):
    """Messages from one SQS queue."""

    # One request hands out ten as cheaply as one (SQS bills per request).
    batch_hint = MAX_BATCH

    def __init__(self, target: SqsTarget, options: BrokerOptions) -> None:
        self.target = target
        self.options = options
        self.counters = Counters()
        self._closed = False
        self._lag_at = 0.0
        self._termed: OrderedDict[str, None] = OrderedDict()
        self._termed_lock = threading.Lock()
        config = botocore.config.Config(
            # A long poll must not be cut by the read timeout.
            read_timeout=MAX_WAIT + 10,
            connect_timeout=5,
            retries={"mode": "standard", "max_attempts": 3},
        )
        # A session of its own: boto3's default session is not safe to share between
        # threads, its clients are.
        session = boto3.session.Session()
        try:
            self.client: Any = session.client("sqs", region_name=target.region, config=config)
            self.queue_url = (
                target.url or self.client.get_queue_url(QueueName=target.name)["QueueUrl"]
            )
            attributes = self.client.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["VisibilityTimeout", "RedrivePolicy"]
            )["Attributes"]
        except botocore.exceptions.NoRegionError:
            raise UsageError(
                f"--events sqs://{target.name}: no AWS region (set AWS_DEFAULT_REGION, or give the "
                "queue's https URL)"
            ) from None
        except botocore.exceptions.NoCredentialsError:
            raise UsageError(f"--events {target.describe()}: no AWS credentials found") from None
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _NO_QUEUE:
                raise UsageError(f"--events: {target.describe()} does not exist") from None
            raise UsageError(f"--events {target.describe()}: {exc}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise UsageError(f"--events {target.describe()}: {exc}") from None
        self.lease = float(attributes.get("VisibilityTimeout", 30))
        redrive = json.loads(attributes.get("RedrivePolicy") or "{}")
        #: The redrive policy's maxReceiveCount, None when the queue has no DLQ.
        self.max_receive_count: int | None = (
            int(redrive["maxReceiveCount"]) if "maxReceiveCount" in redrive else None
        )
        self.dead_letter_queue: str | None = redrive.get("deadLetterTargetArn")

    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        if self._closed:
            return []
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            reply = self.client.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=max(1, min(MAX_BATCH, max_messages)),
                WaitTimeSeconds=min(MAX_WAIT, math.ceil(max(0.0, timeout))),
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
            messages: list[Message] = []
            for raw in reply.get("Messages", []):
                if self._was_termed(raw["MessageId"]):
                    # On its way to the DLQ: each receive counts towards maxReceiveCount.
                    self._hide(raw["ReceiptHandle"], 0)
                    continue
                count = int(raw.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
                body = raw.get("Body", "").encode()
                messages.append(
                    _SqsMessage(self, raw["MessageId"], raw["ReceiptHandle"], body, count)
                )
            self._refresh_lag()
        except _ERRORS as exc:
            self.counters.set_connected(False)
            _log.warning("%s: %s: %s", self.describe(), type(exc).__name__, exc)
            time.sleep(max(0.0, deadline - time.monotonic()))  # rather than spin
            return []
        self.counters.set_connected(True)
        self.counters.delivered([m.delivery_count for m in messages])
        return messages

    def ack_all(self, messages: Sequence[Message]) -> None:
        ack_together(own(messages, _SqsMessage), MAX_BATCH, self._delete_batch)

    def _delete_batch(self, chunk: list[_SqsMessage]) -> dict[int, str]:
        reply = self.client.delete_message_batch(
            QueueUrl=self.queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m._receipt} for i, m in enumerate(chunk)],
        )
        return {
            int(failed["Id"]): f"{failed.get('Code', '')}: {failed.get('Message', '')}"
            for failed in reply.get("Failed", [])
        }

    def _refresh_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY:
            return
        self._lag_at = now
        attributes = self.client.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
        self.counters.lag = int(attributes.get("ApproximateNumberOfMessages", 0))

    def _hide(self, receipt: str, seconds: float) -> None:
        self.client.change_message_visibility(
            QueueUrl=self.queue_url,
            ReceiptHandle=receipt,
            VisibilityTimeout=min(MAX_VISIBILITY, math.ceil(seconds)),
        )

    def _remember_termed(self, message_id: str) -> None:
        with self._termed_lock:
            self._termed[message_id] = None
            while len(self._termed) > TERMED_MEMORY:
                self._termed.popitem(last=False)

    def _was_termed(self, message_id: str) -> bool:
        with self._termed_lock:
            return message_id in self._termed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()

    def statistics(self) -> BrokerStatistics:
        return self.counters.snapshot()

    def describe(self) -> str:
        return self.target.describe()


class _SqsMessage(BrokerMessage):
    broker_errors = _ERRORS

    def __init__(
        self, source: SqsSource, message_id: str, receipt: str, body: bytes, count: int
    ) -> None:
        super().__init__(source.counters, body, count, message_id)
        self._source = source
        self._receipt = receipt

    def _ack(self) -> None:
        source = self._source
        source.client.delete_message(QueueUrl=source.queue_url, ReceiptHandle=self._receipt)

    def _nak(self, delay: float) -> None:
        self._source._hide(self._receipt, delay)

    def _extend(self, seconds: float) -> None:
        self._source._hide(self._receipt, seconds)

    def _term(self, reason: str) -> None:
        source = self._source
        if source.max_receive_count is None:
            source.client.delete_message(QueueUrl=source.queue_url, ReceiptHandle=self._receipt)
            _log.warning(
                "SQS message %s deleted (the queue has no redrive policy, so no DLQ): %s",
                self.id,
                reason,
            )
            return
        source._remember_termed(self.id)
        source._hide(self._receipt, 0)
        _log.warning(
            "SQS message %s dead-lettered: %s (the redrive policy moves it to %s after "
            "%d receives)",
            self.id,
            reason,
            source.dead_letter_queue,
            source.max_receive_count,
        )
