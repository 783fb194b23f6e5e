"""Names of the JetStream protocol this project relies on: headers and API error codes.

Every header name and error code used anywhere is spelled here, once.
"""

from __future__ import annotations

__all__ = [
    "ERR_NO_PLACEMENT",
    "ERR_QUEUE_FULL",
    "ERR_STREAM_IN_USE",
    "ERR_WRONG_LAST_SEQUENCE",
    "HDR_DLQ_AT",
    "HDR_DLQ_ERROR",
    "HDR_DLQ_SOURCE",
    "HDR_DLQ_SUBJECT",
    "HDR_DLQ_TRUNCATED",
    "HDR_EXPECTED_LAST_SUBJECT_SEQUENCE",
    "HDR_KV_OPERATION",
    "HDR_MARKER_REASON",
    "HDR_MSG_ID",
    "HDR_NUM_PENDING",
    "HDR_SEQUENCE",
    "HDR_STATUS",
    "HDR_SUBJECT",
    "KV_REMOVED",
]

# NATS headers
HDR_MSG_ID = "Nats-Msg-Id"  # deduplication within a stream's duplicate window
# a KV compare-and-swap: stored only if the key's last revision is this one
HDR_EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
HDR_KV_OPERATION = "KV-Operation"  # set on KV deletes and purges
HDR_MARKER_REASON = "Nats-Marker-Reason"  # set on the markers of expired keys
KV_REMOVED = ("DEL", "PURGE")  # KV-Operation values of a removed key
# answers of a batched direct get (server 2.11+): each message with its stream sequence, the
# last with a status (204 end of batch, 404 nothing) and how many matches are left
HDR_STATUS = "Status"
HDR_SEQUENCE = "Nats-Sequence"
HDR_SUBJECT = "Nats-Subject"
HDR_NUM_PENDING = "Nats-Num-Pending"

# Our dead letters carry where they came from and why
HDR_DLQ_SOURCE = "Prov-Dlq-Source"
HDR_DLQ_SUBJECT = "Prov-Dlq-Subject"
HDR_DLQ_ERROR = "Prov-Dlq-Error"
HDR_DLQ_AT = "Prov-Dlq-At"
HDR_DLQ_TRUNCATED = "Prov-Dlq-Truncated"

# JetStream API error codes
ERR_STREAM_IN_USE = 10058  # a stream (or bucket) of that name exists with another config
ERR_WRONG_LAST_SEQUENCE = (10071, 10164)  # a compare-and-swap lost: the key changed meanwhile
ERR_QUEUE_FULL = (10077, 10078, 10047)  # max messages, max bytes, insufficient resources
# placement refused while cluster peers are missing ("no suitable peers", "insufficient
# resources"): transient while the servers of a cluster start
ERR_NO_PLACEMENT = (10005, 10023)
