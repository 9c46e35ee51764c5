"""Session-ticket keys derived from a secret shared by all server processes, rotated per period.

Every process that holds the same secret computes the same key for the same
period, so a ticket issued by one worker (or machine) resumes on any other.
At each period boundary the key changes and older tickets fall back to a
full handshake; OpenSSL renews TLS 1.3 tickets on every resumption, so a
polling device pays one full handshake per period.

Why the symbol lookup: OpenSSL sets ticket keys with
SSL_CTX_set_tlsext_ticket_keys, a macro over SSL_CTX_ctrl. Neither pyOpenSSL
26 nor cryptography's cffi bindings expose SSL_CTX_ctrl, and cryptography
links OpenSSL statically with hidden symbols, so nothing can be bound at run
time. The wheel keeps its full symbol table, though, so we read the address of
SSL_CTX_ctrl there and call it through cffi, after checking that the load
address and one bound function agree and that OpenSSL reports the expected
key length. If any check fails, `install` returns False, logs a warning once,
and OpenSSL keeps its own random key: tickets then resume only on workers
forked after the context was built.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

from cryptography.hazmat.bindings import _rust
from cryptography.hazmat.bindings._rust import _openssl
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from OpenSSL import SSL

log = logging.getLogger(__name__)

DEFAULT_PERIOD = 12 * 3600
# From openssl/ssl.h; unchanged since OpenSSL 1.0.
_CTRL_GET_TICKET_KEYS = 58
_CTRL_SET_TICKET_KEYS = 59
_KEY_LENGTH = 80  # 16-byte key name, 32-byte HMAC key, 32-byte AES key
_ANCHOR = "SSL_CTX_get_options"  # a function the bindings do export


class TicketKeys:
    """Ticket keys from a shared secret: key(period n) = HKDF(secret, n)."""

    def __init__(
        self,
        secret: bytes,
        period: float = DEFAULT_PERIOD,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < 32:
            raise ValueError("the ticket secret must be at least 32 bytes")
        self._secret = secret
        self._period = period
        self._clock = clock
        self._installed: WeakKeyDictionary[SSL.Context, int] = WeakKeyDictionary()

    def key(self, epoch: int) -> bytes:
        """The 80-byte OpenSSL ticket key for rotation period number `epoch`."""
        info = b"certfleet tls ticket key v1 " + epoch.to_bytes(8, "big")
        return HKDF(hashes.SHA256(), _KEY_LENGTH, salt=None, info=info).derive(self._secret)

    def refresh(self, context: SSL.Context) -> None:
        """Install the current period's key unless already done; cheap enough to call per accept."""
        epoch = int(self._clock() // self._period)
        if self._installed.get(context) != epoch:
            install(context, self.key(epoch))
            self._installed[context] = epoch  # a failure would only repeat itself


def install(context: SSL.Context, key: bytes) -> bool:
    """Set the context's ticket key; False, with one warning, where this OpenSSL build won't."""
    ctrl = _ssl_ctx_ctrl()
    if ctrl is None:
        return False
    ffi = _openssl.ffi
    ctx = context._context
    if ctrl(ctx, _CTRL_SET_TICKET_KEYS, 0, ffi.NULL) != len(key):
        _warn_once(f"OpenSSL expects another ticket key length than {len(key)}")
        return False
    buf = ffi.new("unsigned char[]", key)
    ctrl(ctx, _CTRL_SET_TICKET_KEYS, len(key), buf)
    check = ffi.new("unsigned char[]", len(key))
    ctrl(ctx, _CTRL_GET_TICKET_KEYS, len(key), check)
    if ffi.buffer(check)[:] != key:
        _warn_once("OpenSSL did not take the ticket key")
        return False
    return True


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning(
        "TLS ticket keys not shared (%s); tickets resume only within one process tree", reason
    )


@functools.cache
def _ssl_ctx_ctrl() -> Any | None:
    """SSL_CTX_ctrl of the OpenSSL inside cryptography's shared object, or None."""
    path = os.path.realpath(_rust.__file__)
    try:
        symbols = _elf_symbols(path, ["SSL_CTX_ctrl", "_cffi_d_" + _ANCHOR])
        base = _load_base(path)
    except (OSError, ValueError, struct.error) as exc:
        _warn_once(f"cannot read {path}: {exc}")
        return None
    if base is None or len(symbols) != 2:
        _warn_once("SSL_CTX_ctrl not found in cryptography's symbol table")
        return None
    ffi, lib = _openssl.ffi, _openssl.lib
    anchor = int(ffi.cast("uintptr_t", ffi.addressof(lib, _ANCHOR)))
    # cffi hands out its direct-call wrapper; it must sit where the table says.
    if anchor != base + symbols["_cffi_d_" + _ANCHOR]:
        _warn_once("symbol table does not match the loaded library")
        return None
    address = base + symbols["SSL_CTX_ctrl"]
    return ffi.cast("long (*)(SSL_CTX *, int, long, void *)", address)


def _elf_symbols(path: str, names: list[str]) -> dict[str, int]:
    """Addresses (relative to the load base) of the named functions in a 64-bit ELF .symtab."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as elf:
        if elf[:6] != b"\x7fELF\x02\x01":
            raise ValueError("not a little-endian 64-bit ELF file")
        (shoff,) = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
        sections = [
            struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)
        ]
        symtab = next((s for s in sections if s[1] == 2), None)  # SHT_SYMTAB
        if symtab is None:
            return {}
        strtab = sections[symtab[6]]
        strings = elf[strtab[4] : strtab[4] + strtab[5]]
        wanted = {strings.find(b"\0" + n.encode() + b"\0") + 1: n for n in names}
        found = {}
        table = elf[symtab[4] : symtab[4] + symtab[5]]
        for name_at, info, _, _, value, _ in struct.iter_unpack("<IBBHQQ", table):
            if name_at in wanted and info & 0xF == 2:  # STT_FUNC
                found[wanted[name_at]] = value
        return found


def _load_base(path: str) -> int | None:
    """Where the shared object's first byte is mapped in this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == path and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    return None
