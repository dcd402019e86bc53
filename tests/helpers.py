"""Small builders shared by tests (no mocks: real messages, real sockets)."""

from __future__ import annotations

import time

from async_vapo.controller.admission import GroupRules
from async_vapo.protocol import Prompt, Response, TrajectoryGroup, pack_f32, pack_i32


def rules(**over) -> GroupRules:
    """The bounds ``make_group``'s defaults respect (4 samples of up to 64 tokens, ids < 1000)."""
    base = dict(
        vocab_size=1000,
        n_samples=4,
        max_tokens=64,
        max_model_len=256,
        correct_reward=1.0,
        wrong_reward=0.0,
        tensor_parallel_size=1,
        eval_samples=4,
    )
    return GroupRules(**(base | over))


def make_group(
    uid: str = "p0",
    n: int = 4,
    tokens: int = 8,
    version: int = 0,
    rewards=None,
    worker: str = "w0",
    seq: int = 0,
    eval_round: int = 0,
    prompt: Prompt | None = None,
) -> TrajectoryGroup:
    """A group of ``n`` responses; ``prompt``: the prompt exactly as issued (ticket included), which a
    controller requires; else a fresh one for ``uid`` (enough for the buffer alone)."""
    rewards = rewards if rewards is not None else [float(i % 2) for i in range(n)]
    responses = [
        Response(
            token_ids=pack_i32(list(range(seq, seq + tokens))),
            logprobs=pack_f32([-0.5] * tokens),
            versions=pack_i32([version] * tokens),
            finish_reason="stop",
            reward=rewards[i],
            correct=rewards[i] > 0,
            verdict="ok",
        )
        for i in range(n)
    ]
    prompt = prompt if prompt is not None else Prompt(uid, pack_i32([1, 2, 3]), "42")
    return TrajectoryGroup(prompt, responses, worker, time.time(), eval_round=eval_round)


def process_tree(root: int) -> set[int]:
    """``root`` and every live descendant (from /proc: parent links survive a child's setsid)."""
    import os

    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def listening_sockets(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by one of ``pids`` (from /proc)."""
    import ipaddress
    import os

    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                    continue
                hexaddr, hexport = cols[1].split(":")
                raw = bytes.fromhex(hexaddr)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((str(ipaddress.ip_address(raw)), int(hexport, 16)))
    return found


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_tokenizer(out_dir):
    """A real Hugging Face tokenizer, one token per printable ASCII character, with a chat template of its
    own (``<role>content`` lines, ``<assistant>`` as the generation prompt); saved to ``out_dir``."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast
