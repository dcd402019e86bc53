"""Every type that crosses a process boundary, in one place.

A frame on any socket is ``b"AV" + uint16 LE protocol version + msgpack(message)``; the codec checks the
header before it decodes anything. Messages are tagged msgspec Structs encoded as arrays (no field names
on the wire). Token ids, log-probs and versions travel as raw little-endian buffers, never as lists.

Invariants (checked by ``validate`` on every decoded message):
- In a ``Response``, ``token_ids`` (int32), ``logprobs`` (float32) and ``versions`` (int32) describe the
  same tokens: their byte lengths are 4 * n_tokens each. Log-probs are finite and <= 0.
- ``versions`` holds the policy version under which each token was sampled; non-decreasing.
- A ``TrajectoryGroup`` holds the N responses of one prompt (Group-Sampling), N >= 1.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

import msgspec
import numpy as np

# 2: evaluation rounds are numbered (Assign / TrajectoryGroup.eval_round)
# 3: prompts carry a ticket; a worker reports the prompts it could not finish (RolloutFailed)
# 4: Control("rejoin"): a restarted learner world asks a live worker to say Hello again, engine kept;
#    Prompt.extras (the row's fields for the verifiers)
PROTOCOL_VERSION = 4

FinishReason = Literal["stop", "length", "abort"]
ControlKind = Literal["shutdown", "rejoin"]
# what a verifier concluded; ``Response.verdict`` is one of these, optionally followed by ": detail"
VerdictKind = Literal["ok", "wrong", "no_answer", "timeout", "error", "bad_output"]
VERDICT_KINDS: frozenset[str] = frozenset(get_args(VerdictKind))


# decode-time caps: a hostile frame is refused while its array headers are read, before millions of
# objects are built (the config refuses settings beyond them: rollout.n_samples, rollout.eval_samples)
MAX_RESPONSES = 1024  # responses in one group
MAX_TOKENS = 1 << 20  # tokens in one prompt or response (4 bytes each)
MAX_PROMPTS = 1 << 16  # prompts in one Assign
Tokens = Annotated[bytes, msgspec.Meta(max_length=4 * MAX_TOKENS)]
ShortText = Annotated[str, msgspec.Meta(max_length=1 << 16)]


def verdict_kind(verdict: str) -> str:
    """The ``VerdictKind`` a verdict string starts with, or ``"other"`` (a peer cannot invent kinds)."""
    kind = verdict.split(":", 1)[0]
    return kind if kind in VERDICT_KINDS else "other"


class ProtocolError(ValueError):
    """A frame or message that breaks the protocol. ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def pack_i32(values: np.ndarray | list[int]) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def pack_f32(values: np.ndarray | list[float]) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def unpack_i32(buf: bytes) -> np.ndarray:
    return np.frombuffer(buf, dtype="<i4")


def unpack_f32(buf: bytes) -> np.ndarray:
    return np.frombuffer(buf, dtype="<f4")


class _Wire(msgspec.Struct, array_like=True, gc=False, frozen=True, tag=True):
    def validate(self) -> None:  # pragma: no cover - overridden where there is something to check
        return None


class Prompt(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """One unit of work: a prompt to sample ``n`` responses for. ``uid`` is unique per dataset row and
    epoch; ``attempt`` counts requeues (a stale or lost group's prompt comes back with attempt + 1).
    ``ticket`` is a random string minted each time the prompt is handed out: the group that answers it
    must carry the prompt exactly as sent, ticket included (uids are predictable, tickets are not)."""

    uid: ShortText
    token_ids: Tokens  # int32 LE
    answer: ShortText
    task: ShortText = "math"
    attempt: int = 0
    ticket: ShortText = ""
    extras: ShortText = ""  # JSON of the row's ``data.extra_fields`` (verifiers' keyword arguments)


class Response(msgspec.Struct, array_like=True, gc=False, frozen=True):
    token_ids: Tokens  # int32 LE, n tokens (EOS included when generated)
    logprobs: Tokens  # float32 LE, n: behaviour log-prob of each sampled token (log mu)
    versions: Tokens  # int32 LE, n: policy version that sampled each token
    finish_reason: FinishReason
    reward: float
    correct: bool
    verdict: ShortText = ""  # a VerdictKind, optionally followed by ": detail"

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids) // 4

    def validate(self) -> None:
        n = len(self.token_ids)
        if n % 4 or len(self.logprobs) != n or len(self.versions) != n:
            raise ProtocolError(
                "length_mismatch",
                f"token_ids/logprobs/versions byte lengths {n}/{len(self.logprobs)}/{len(self.versions)}",
            )
        lp = unpack_f32(self.logprobs)
        if lp.size and not (np.isfinite(lp).all() and (lp <= 1e-3).all()):
            raise ProtocolError("bad_logprobs", "log-probs must be finite and <= 0")
        ver = unpack_i32(self.versions)
        if ver.size and ((ver < 0).any() or (np.diff(ver) < 0).any()):
            raise ProtocolError("bad_versions", "token versions must be >= 0 and non-decreasing")
        if not math.isfinite(self.reward):
            raise ProtocolError("bad_reward", f"reward {self.reward!r} is not finite")


class TrajectoryGroup(_Wire, tag="group", frozen=True):
    """N sampled responses of one prompt, scored, with per-token versions (rollout -> learner)."""

    prompt: Prompt
    responses: Annotated[list[Response], msgspec.Meta(max_length=MAX_RESPONSES)]
    worker_id: ShortText
    sent_at: float
    gen_seconds: float = 0.0
    verify_seconds: float = 0.0
    eval_round: int = 0  # the Assign's evaluation round; 0 = training

    def validate(self) -> None:
        if not self.responses:
            raise ProtocolError("empty_group", f"group for prompt {self.prompt.uid!r} has no responses")
        if len(self.prompt.token_ids) % 4:
            raise ProtocolError("length_mismatch", "prompt token_ids is not a whole number of int32")
        for r in self.responses:
            r.validate()

    @property
    def oldest_version(self) -> int:
        """The oldest policy version of any token in the group (staleness is measured from it)."""
        firsts = [int(unpack_i32(r.versions)[0]) for r in self.responses if r.n_tokens]
        return min(firsts) if firsts else 0

    @property
    def n_tokens(self) -> int:
        return sum(r.n_tokens for r in self.responses)


class Sampling(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """Per-assignment sampling settings (evaluation uses its own; training uses the worker's defaults)."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int


class Assign(_Wire, tag="assign", frozen=True):
    """Learner side -> one rollout worker: prompts to sample (each one is a credit for one group)."""

    prompts: Annotated[list[Prompt], msgspec.Meta(max_length=MAX_PROMPTS)]
    sampling: Sampling | None = None  # None: the worker's training settings
    eval_round: int = 0  # > 0: an evaluation round (the groups carry it back; they are not trained on)


class JoinGroup(_Wire, tag="join", frozen=True):
    """Learner -> rollout worker: join the weight-sync process group served at host:port as rank 1+."""

    host: str
    port: int
    world_size: int
    backend: str
    timeout_s: float
    store_file: str = ""  # one machine: the group's FileStore instead of the TCPStore at host:port


class WorkerStats(_Wire, tag="stats", frozen=True):
    """Rollout worker -> learner, with every heartbeat: cumulative counters since the worker started."""

    worker_id: str
    busy_seconds: float  # wall time with at least one request in the engine
    alive_seconds: float
    generated_tokens: int
    in_flight: int
    version: int


class WeightUpdate(_Wire, tag="weights", frozen=True):
    """Learner -> rollout worker: version ``version`` is about to be broadcast over the worker's process
    group as ``buckets`` (each a list of (name, dtype, shape)); join the broadcast, load, then ack."""

    version: int
    buckets: list[list[tuple[str, str, list[int]]]]


class WeightAck(_Wire, tag="ack", frozen=True):
    """Rollout worker -> learner: ``version`` is loaded and every later token is sampled under it."""

    worker_id: str
    version: int
    load_seconds: float = 0.0
    ok: bool = True
    error: str = ""


class RolloutFailed(_Wire, tag="failed", frozen=True):
    """Rollout worker -> learner: the prompt ``uid`` (sent with ``ticket``) could not be sampled or
    scored (``error`` says why); the controller requeues it or, out of attempts, counts it as failed."""

    worker_id: str
    uid: str
    ticket: str
    eval_round: int = 0
    error: str = ""


class Hello(_Wire, tag="hello", frozen=True):
    """Rollout worker -> learner on (re)connect: who I am, which version my engine holds, and how many
    vLLM workers (tensor-parallel ranks) it has: each of them joins the engine's weight group."""

    worker_id: str
    version: int
    pid: int
    tensor_parallel_size: int = 1

    def validate(self) -> None:
        if not 1 <= self.tensor_parallel_size <= 64:
            raise ProtocolError(
                "bad_field", f"tensor_parallel_size {self.tensor_parallel_size} not in [1, 64]"
            )


class Control(_Wire, tag="control", frozen=True):
    """Learner -> rollout worker: ``shutdown`` (``reason`` says whether to come back), or ``rejoin``: the
    learner world that welcomed it is gone; drop what it was given and say Hello to this one, keeping the
    engine (the new controller syncs its weights)."""

    kind: ControlKind
    sender: str = ""
    sent_at: float = 0.0
    reason: str = ""  # shutdown: "finished" (the run is over) or "dropped" (exit and be restarted)


Message = (
    TrajectoryGroup
    | Assign
    | JoinGroup
    | WeightUpdate
    | WeightAck
    | Hello
    | Control
    | WorkerStats
    | RolloutFailed
)


# ---- between learner ranks (torch.distributed, never on the ZeroMQ sockets) ------------------------------


class PublishTarget(msgspec.Struct, array_like=True, frozen=True):
    """One engine taking a streamed update: which learner rank feeds it, and when that rank has no
    link to it yet, the group to join (host, port, world size, backend, timeout) as the group's rank 0."""

    worker_id: str
    owner: int
    join: tuple[str, int, int, str, float, str] | None = None  # GroupSpec's fields


class PublishPlan(msgspec.Struct, array_like=True, frozen=True):
    """Learner rank 0 -> every learner rank before a streamed publish (``weight_sync.fanout``)."""

    version: int
    targets: list[PublishTarget]
    live: list[str]  # workers the controller still knows: links to any other are closed
