"""The kfunc patching of the netfilter-link program (no root, no kernel): only placeholder helper
calls become kfunc calls, and the placeholders agree with bpf/lib/kfunc.h."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from agent.dataplane.bpf.netfilter import (
    BPF_CALL_INSN,
    BPF_PSEUDO_KFUNC_CALL,
    KFUNC_PLACEHOLDERS,
    patch_kfunc_calls,
)

KFUNC_HEADER = Path(__file__).resolve().parents[2] / "bpf" / "lib" / "kfunc.h"
MOV64_IMM = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K


def instruction(code: int, dst: int = 0, src: int = 0, offset: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, offset, imm)


def decode(code: bytes) -> list[tuple[int, int, int, int, int]]:
    out = []
    for at in range(0, len(code), 8):
        opcode, registers, offset, imm = struct.unpack_from("<BBhi", code, at)
        out.append((opcode, registers & 0x0F, registers >> 4, offset, imm))
    return out


def test_only_calls_of_a_placeholder_id_become_kfunc_calls() -> None:
    placeholder = next(iter(KFUNC_PLACEHOLDERS))
    program = b"".join(
        (
            instruction(MOV64_IMM, dst=1, imm=placeholder),  # the same number, not a call
            instruction(BPF_CALL_INSN, imm=placeholder),
            instruction(BPF_CALL_INSN, imm=1),  # bpf_map_lookup_elem: a real helper
            instruction(BPF_CALL_INSN, src=1, imm=placeholder),  # a bpf-to-bpf call (src 1): not ours
        )
    )
    patched = decode(patch_kfunc_calls(program, {placeholder: 63782}))
    assert patched[0] == (MOV64_IMM, 1, 0, 0, placeholder)
    assert patched[1] == (BPF_CALL_INSN, 0, BPF_PSEUDO_KFUNC_CALL, 0, 63782)
    assert patched[2] == (BPF_CALL_INSN, 0, 0, 0, 1)
    assert patched[3] == (BPF_CALL_INSN, 0, 1, 0, placeholder)


def test_a_truncated_instruction_stream_is_refused() -> None:
    with pytest.raises(ValueError):
        patch_kfunc_calls(instruction(BPF_CALL_INSN)[:5], {})


def test_placeholders_match_the_c_declarations_and_no_helper_id() -> None:
    definition = re.compile(r"#define PF_KFUNC_\w+\s+(0x[0-9a-f]+)\s+/\*\s*\w+ (\w+)\(")
    declared = {int(value, 16): kfunc for value, kfunc in definition.findall(KFUNC_HEADER.read_text())}
    assert declared == KFUNC_PLACEHOLDERS
    assert min(KFUNC_PLACEHOLDERS) > 1024  # helper ids are a few hundred at most
