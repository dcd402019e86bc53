"""Every name the controller counts under (``controller_counters`` in each ``metrics.jsonl`` training row):
one enum, so that a name is found by grep and a misspelt one fails where it is counted. The families
whose member is picked by a reason (a group's verdict, a refusal, a drop) are built by the functions
below, which accept only the reasons listed here.

A ``Count`` is a ``str``: counters are keyed by it, written to JSON as its value, and looked up with the
plain string as well (``counters["group_admitted"]``).
"""

from __future__ import annotations

from enum import Enum

from async_vapo.controller.admission import GroupRejection


class Count(str, Enum):
    def __str__(self) -> str:
        return self.value

    # a group the buffer took or turned away (buffer.GroupBuffer.put)
    GROUP_ADMITTED = "group_admitted"
    GROUP_DUPLICATE = "group_duplicate"  # for a prompt not outstanding (answered already, or never issued)
    GROUP_STALE = "group_stale"  # older than train.max_staleness allows: its prompt is requeued
    GROUP_FILTERED = "group_filtered"  # dynamic sampling: all rewards equal
    # a group refused against what was issued (controller/admission.py check_group)
    GROUP_REJECTED_WRONG_WORKER = "group_rejected_wrong_worker"
    GROUP_REJECTED_PROMPT_MISMATCH = "group_rejected_prompt_mismatch"
    GROUP_REJECTED_SAMPLE_COUNT = "group_rejected_sample_count"
    GROUP_REJECTED_LENGTH = "group_rejected_length"
    GROUP_REJECTED_MODEL_LEN = "group_rejected_model_len"
    GROUP_REJECTED_TOKEN_RANGE = "group_rejected_token_range"
    GROUP_REJECTED_VERSIONS = "group_rejected_versions"
    GROUP_REJECTED_REWARD = "group_rejected_reward"
    # the verifier's outcome of each response of an admitted (or stale / filtered) group (VerdictKind)
    VERDICT_OK = "verdict_ok"
    VERDICT_WRONG = "verdict_wrong"
    VERDICT_NO_ANSWER = "verdict_no_answer"
    VERDICT_TIMEOUT = "verdict_timeout"
    VERDICT_ERROR = "verdict_error"
    VERDICT_BAD_OUTPUT = "verdict_bad_output"
    VERDICT_OTHER = "verdict_other"  # a verdict string of no known kind (a peer cannot invent kinds)
    # a Hello refused (admission.check_hello, and the controller's rate limit)
    HELLO_REJECTED_BAD_WORKER_ID = "hello_rejected_bad_worker_id"
    HELLO_REJECTED_IDENTITY_MISMATCH = "hello_rejected_identity_mismatch"
    HELLO_REJECTED_UNPLANNED_WORKER = "hello_rejected_unplanned_worker"
    HELLO_REJECTED_TP_MISMATCH = "hello_rejected_tp_mismatch"
    HELLO_REJECTED_TOO_FREQUENT = "hello_rejected_too_frequent"
    # a worker accepted, refused or dropped
    HELLO_RESTARTED_WEIGHTS_UNAVAILABLE = "hello_restarted_weights_unavailable"
    WORKER_DROPPED_HEARTBEAT = "worker_dropped_heartbeat"
    WORKER_DROPPED_UNREACHABLE = "worker_dropped_unreachable"
    WORKER_DROPPED_STALLED = "worker_dropped_stalled"
    WORKER_DROPPED_WEIGHT_SYNC_FAILED = "worker_dropped_weight_sync_failed"
    WEIGHT_SYNC_FAILED = "weight_sync_failed"
    # messages on the wrong road or from the wrong peer
    UNEXPECTED_ON_DATA = "unexpected_on_data"
    MESSAGE_FROM_UNKNOWN_WORKER = "message_from_unknown_worker"
    CONTROL_IDENTITY_MISMATCH = "control_identity_mismatch"
    # prompts whose rollout failed or ran out of time
    ROLLOUT_FAILED = "rollout_failed"
    ROLLOUT_FAILED_UNKNOWN = "rollout_failed_unknown"  # a failure reported for a prompt not outstanding
    PROMPT_DEADLINE_EXPIRED = "prompt_deadline_expired"
    # evaluation rounds
    EVAL_PROMPT_FAILED = "eval_prompt_failed"
    EVAL_PROMPTS_REASSIGNED = "eval_prompts_reassigned"
    EVAL_ROUNDS_PARTIAL = "eval_rounds_partial"


def group_outcome(verdict: str) -> Count:
    """``GroupBuffer.put``'s verdict ("admitted", "duplicate", "stale", "filtered")."""
    return Count(f"group_{verdict}")


def group_rejected(why: GroupRejection) -> Count:
    return Count(f"group_rejected_{why.value}")


def verdict(kind: str) -> Count:
    """A ``protocol.verdict_kind`` (or "other")."""
    return Count(f"verdict_{kind}")


def hello_rejected(why: str) -> Count:
    return Count(f"hello_rejected_{why}")


def worker_dropped(reason: str) -> Count:
    return Count(f"worker_dropped_{reason}")
