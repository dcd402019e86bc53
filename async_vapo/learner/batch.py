"""Groups off the wire -> padded tensors for the learner.

Layout: each row is ``prompt + response`` right padded to ``L``; response-aligned tensors are [B, T] with
``T`` = the longest response. ``resp_index[b, t]`` is the position in the full row whose logits predict
response token ``t`` (``prompt_len_b - 1 + t``), also the state whose value is ``V(s_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from async_vapo.protocol import TrajectoryGroup, unpack_f32, unpack_i32


@dataclass
class Batch:
    input_ids: torch.Tensor  # long [B, L]
    attention_mask: torch.Tensor  # long [B, L]
    resp_index: torch.Tensor  # long [B, T]
    response_ids: torch.Tensor  # long [B, T]
    mask: torch.Tensor  # bool [B, T]
    behaviour_logprobs: torch.Tensor  # float [B, T]
    versions: torch.Tensor  # long [B, T]
    scores: torch.Tensor  # float [B]
    correct: torch.Tensor  # bool [B]
    truncated: torch.Tensor  # bool [B]
    group_ids: torch.Tensor  # long [B]

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def row_lengths(self) -> torch.Tensor:
        """long [B]: tokens in each row (prompt + response)."""
        return self.attention_mask.sum(1)

    @property
    def response_lengths(self) -> torch.Tensor:
        """long [B]: response tokens in each row."""
        return self.mask.sum(1)

    def select(self, rows: torch.Tensor | slice) -> Batch:
        return Batch(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def collate(groups: list[TrajectoryGroup], pad_id: int) -> Batch:
    rows = []
    for gi, g in enumerate(groups):
        prompt = unpack_i32(g.prompt.token_ids).tolist()
        for r in g.responses:
            rows.append(
                (
                    gi,
                    prompt,
                    unpack_i32(r.token_ids).tolist(),
                    unpack_f32(r.logprobs).tolist(),
                    unpack_i32(r.versions).tolist(),
                    r.reward,
                    r.correct,
                    r.finish_reason == "length",
                )
            )
    b = len(rows)
    seq_len = max(len(p) + len(t) for _, p, t, *_ in rows)
    resp_len = max(1, max(len(t) for _, _, t, *_ in rows))
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((b, seq_len), dtype=torch.long)
    resp_index = torch.zeros((b, resp_len), dtype=torch.long)
    response_ids = torch.full((b, resp_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, resp_len), dtype=torch.bool)
    behaviour = torch.zeros((b, resp_len))
    versions = torch.zeros((b, resp_len), dtype=torch.long)
    for i, (_, prompt, toks, lps, vers, *_rest) in enumerate(rows):
        n, p = len(toks), len(prompt)
        input_ids[i, : p + n] = torch.tensor(prompt + toks, dtype=torch.long)
        attention[i, : p + n] = 1
        resp_index[i] = (p - 1 + torch.arange(resp_len)).clamp(max=seq_len - 1)
        if n:
            response_ids[i, :n] = torch.tensor(toks, dtype=torch.long)
            mask[i, :n] = True
            behaviour[i, :n] = torch.tensor(lps)
            versions[i, :n] = torch.tensor(vers, dtype=torch.long)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        resp_index=resp_index,
        response_ids=response_ids,
        mask=mask,
        behaviour_logprobs=behaviour,
        versions=versions,
        scores=torch.tensor([r[5] for r in rows], dtype=torch.float32),
        correct=torch.tensor([r[6] for r in rows], dtype=torch.bool),
        truncated=torch.tensor([r[7] for r in rows], dtype=torch.bool),
        group_ids=torch.tensor([r[0] for r in rows], dtype=torch.long),
    )


# ---- rank 0 -> other learner ranks (torch.distributed point-to-point) ----------------------------------

_FIELDS: dict[str, tuple[torch.dtype, int]] = {  # Batch field -> (dtype, number of dimensions)
    "input_ids": (torch.long, 2),
    "attention_mask": (torch.long, 2),
    "resp_index": (torch.long, 2),
    "response_ids": (torch.long, 2),
    "mask": (torch.bool, 2),
    "behaviour_logprobs": (torch.float32, 2),
    "versions": (torch.long, 2),
    "scores": (torch.float32, 1),
    "correct": (torch.bool, 1),
    "truncated": (torch.bool, 1),
    "group_ids": (torch.long, 1),
}


def send_batch(b: Batch, dst: int, device: torch.device) -> None:
    """Rank 0 -> rank ``dst``: shapes first, then every tensor (on the communication device: NCCL
    cannot send host tensors). Only the two ranks take part; the others go on."""
    shapes = torch.zeros(len(_FIELDS), 2, dtype=torch.long)
    for i, n in enumerate(_FIELDS):
        t = getattr(b, n)
        shapes[i, : t.dim()] = torch.tensor(t.shape)
    dist.send(shapes.to(device), dst)
    for n in _FIELDS:
        t = getattr(b, n).contiguous()
        dist.send((t.to(torch.uint8) if t.dtype == torch.bool else t).to(device), dst)


def recv_batch(device: torch.device) -> Batch:
    shapes = torch.zeros(len(_FIELDS), 2, dtype=torch.long, device=device)
    dist.recv(shapes, 0)
    out = {}
    for i, (n, (dtype, dim)) in enumerate(_FIELDS.items()):
        shape = [int(x) for x in shapes[i, :dim].tolist()]
        t = torch.empty(shape, dtype=torch.uint8 if dtype == torch.bool else dtype, device=device)
        dist.recv(t, 0)
        out[n] = t.bool() if dtype == torch.bool else t
    return Batch(**out)
