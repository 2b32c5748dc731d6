"""Passwords: the policy a new password must meet, and argon2id hashing off the event loop.

Policy (NIST SP 800-63B-4, OWASP ASVS 5):
- NFKC first, identically when a password is set and when it is checked, and length counted
  in code points of that form;
- at least 15 characters (a password is the only factor), at most 128 characters and 512
  UTF-8 bytes, never truncated: the caps keep a sign-in from costing megabytes of hashing;
- refused when it is a common password, a common password repeated, one short unit repeated,
  a run of consecutive characters, or contains a context word (the owner's name or email,
  the service name);
- no composition rules (no "one digit, one symbol"): the standards say they SHALL NOT be
  imposed, because they push people to predictable patterns.

Problems are short sentences meant for the caller; they never echo the password.

Hashing uses argon2-cffi's `PasswordHasher` (argon2id, RFC 9106 low-memory profile by
default: t=3, m=64 MiB, p=4) in a bounded thread pool: argon2 releases the GIL, so the event
loop keeps serving cheap commands, and at most `workers x memory_cost` is ever allocated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import re
import secrets
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

from argon2 import PasswordHasher, Type, profiles
from argon2.exceptions import InvalidHashError, VerificationError

from services.errors import PasswordPolicyError

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

TOO_COMMON = "is too common; choose a less predictable password"
REPEATED = "must not be a short sequence repeated"
SEQUENTIAL = "must not be a run of consecutive characters"
CONTEXT = "must not contain your name, your email address or the service name"
# Sequences people walk along: the alphabet, digits, and keyboard rows.
_RUNS = ("abcdefghijklmnopqrstuvwxyz", "0123456789", "qwertyuiopasdfghjklzxcvbnm")
_MIN_CONTEXT_WORD = 4


@functools.cache
def load_common_passwords() -> frozenset[str]:
    """The bundled list of common passwords (lower-case, one per line; read once)."""
    text = resources.files("services").joinpath("data/common-passwords.txt").read_text("utf-8")
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def normalize_password(password: str) -> str:
    """The form that is hashed and measured: NFKC, so look-alike input verifies alike."""
    return unicodedata.normalize("NFKC", password)


def _smallest_period(text: str) -> int:
    """Length of the shortest unit that `text` repeats (len(text) if none), via KMP."""
    border = [0] * len(text)
    for i in range(1, len(text)):
        k = border[i - 1]
        while k and text[i] != text[k]:
            k = border[k - 1]
        border[i] = k + (text[i] == text[k])
    return len(text) - border[-1] if text else 0


def _is_run(text: str) -> bool:
    """Whether `text` walks one step at a time through a code-point or keyboard sequence."""
    steps = {ord(b) - ord(a) for a, b in itertools.pairwise(text)}
    if steps in ({1}, {-1}):
        return True
    for run in _RUNS:
        # Wrapping around ("...7890123...") is still walking along the same row.
        looped = run * (len(text) // len(run) + 2)
        if text in looped or text[::-1] in looped:
            return True
    return False


def _context_words(context: Sequence[str], service_words: Sequence[str]) -> Iterator[str]:
    for item in (*context, *service_words):
        folded = normalize_password(item).casefold()
        local_part = folded.partition("@")[0]
        for word in (folded, local_part, *re.split(r"[\W_]+", folded)):
            if len(word) >= _MIN_CONTEXT_WORD:
                yield word


@dataclass(frozen=True)
class PasswordPolicy:
    """What a new password must satisfy; `check_verifiable` guards the sign-in path."""

    min_length: int = 15
    max_length: int = 128
    max_bytes: int = 512
    blocklist: frozenset[str] = dataclasses.field(default_factory=load_common_passwords, repr=False)
    service_words: tuple[str, ...] = ("identity",)

    def _bounded(self, password: str, field: str) -> str:
        # NFKC can shrink a string (combining marks compose) at most a few times over; input
        # far beyond the caps is refused before it is normalised at all.
        if len(password) > 4 * self.max_bytes:
            raise PasswordPolicyError(field, f"must be at most {self.max_length} characters")
        normal = normalize_password(password)
        if len(normal) > self.max_length:
            raise PasswordPolicyError(field, f"must be at most {self.max_length} characters")
        if len(normal.encode("utf-8")) > self.max_bytes:
            raise PasswordPolicyError(field, f"must be at most {self.max_bytes} bytes in UTF-8")
        return normal

    def check_verifiable(self, password: str, *, field: str) -> None:
        """Only the upper bounds: old passwords may predate the minimum, never the caps."""
        self._bounded(password, field)

    def check_new(self, password: str, *, field: str, context: Sequence[str] = ()) -> None:
        """Raise `PasswordPolicyError` naming `field` if `password` may not be set."""
        normal = self._bounded(password, field)
        if len(normal) < self.min_length:
            raise PasswordPolicyError(field, f"must be at least {self.min_length} characters")
        folded = normal.casefold()
        period = _smallest_period(folded)
        repeats = len(folded) % period == 0 and period < len(folded)
        if folded in self.blocklist or (repeats and folded[:period] in self.blocklist):
            raise PasswordPolicyError(field, TOO_COMMON)
        if period < self.min_length and len(folded) >= 2 * period:
            raise PasswordPolicyError(field, REPEATED)
        if _is_run(folded):
            raise PasswordPolicyError(field, SEQUENTIAL)
        if any(word in folded for word in _context_words(context, self.service_words)):
            raise PasswordPolicyError(field, CONTEXT)


def make_hasher(time_cost: int, memory_kib: int, parallelism: int) -> PasswordHasher:
    """An argon2id hasher with the given cost (hash 32 bytes, salt 16 bytes)."""
    return PasswordHasher(
        time_cost=time_cost,
        memory_cost=memory_kib,
        parallelism=parallelism,
        hash_len=32,
        salt_len=16,
        type=Type.ID,
    )


# argon2 allocates its memory (64 MiB by default) afresh for every hash. glibc serves an
# allocation that large from a new mapping, which the kernel fills one 4 KiB page at a time:
# ~16,000 page faults per hash, a quarter of its CPU. Started with this tunable (the Dockerfile
# and `make run` set it), glibc 2.35+ marks such mappings for transparent huge pages when the
# kernel's THP mode is `madvise`: ~40 faults per hash, fewer TLB misses, a quarter less CPU
# per hash and ~30% more hashes per second (BENCHMARKS.md). Under THP `always` the kernel does
# this by itself; under `never`, or for argon2 memory of 32 MiB or less (glibc then reuses its
# heap), it changes nothing. glibc reads it once, when the process starts.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_HUGETLB = "glibc.malloc.hugetlb="
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def malloc_hugetlb() -> str | None:
    """The glibc.malloc.hugetlb value this process started with, if any (glibc takes the last
    one given); for the start-up log and the benchmark."""
    tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
    values = [t.removeprefix(_HUGETLB) for t in tunables if t.startswith(_HUGETLB)]
    return values[-1] if values else None


def glibc_version() -> str | None:
    """The C library's name and version ("glibc 2.36"); None where it is not glibc."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return None


def transparent_huge_pages() -> str | None:
    """The kernel's THP mode (`always`, `madvise` or `never`); None where there is none."""
    try:
        found = re.search(r"\[(\w+)\]", THP_MODE.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def argon2_huge_pages(glibc: str | None, hugetlb: str | None, thp_mode: str | None) -> str:
    """Who puts argon2's (large) memory on transparent huge pages, given the C library
    ("glibc 2.36"), the glibc.malloc.hugetlb value it started with and the kernel's THP mode:
    "kernel" under `always`; "glibc" under `madvise` when glibc 2.35+ started with the tunable
    at 1 (it marks the mapping, MADV_HUGEPAGE); else "none"."""
    if thp_mode == "always":
        return "kernel"
    if thp_mode == "madvise" and hugetlb == "1" and _version(glibc) >= (2, 35):
        return "glibc"
    return "none"


def _version(glibc: str | None) -> tuple[int, ...]:
    name, _, version = (glibc or "").partition(" ")
    if name != "glibc":
        return ()
    return tuple(int(n) for n in version.split(".")[:2] if n.isdigit())


def huge_pages_settings() -> dict[str, str | None]:
    """What decides whether argon2's memory is on huge pages, and the outcome, as the start-up
    log and the benchmark report it."""
    glibc, hugetlb, thp_mode = glibc_version(), malloc_hugetlb(), transparent_huge_pages()
    return {
        "glibc": glibc,
        "glibc_malloc_hugetlb": hugetlb,
        "transparent_hugepage": thp_mode,
        "argon2_huge_pages": argon2_huge_pages(glibc, hugetlb, thp_mode),
    }


def _lower_thread_priority(niceness: int) -> None:
    """Run this hashing thread (and the threads argon2 starts from it, which inherit it) at a
    lower CPU priority: on a busy machine the event loop, the broker and the database come
    first, so a backlog of sign-ups cannot starve cheap commands; hashing loses nothing when
    the CPU is otherwise idle. Linux sets priorities per thread; elsewhere this may not apply."""
    if niceness > 0:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


class HashingPool:
    """Argon2id hashing and verification in a bounded thread pool."""

    def __init__(
        self,
        hasher: PasswordHasher | None = None,
        *,
        workers: int | None = None,
        on_timing: Callable[[str, float], None] | None = None,
        niceness: int = 0,
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError("a hashing pool needs at least one worker")
        self._hasher = hasher or PasswordHasher.from_parameters(profiles.RFC_9106_LOW_MEMORY)
        self._workers = workers or os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(
            self._workers,
            thread_name_prefix="argon2",
            initializer=_lower_thread_priority,
            initargs=(niceness,),
        )
        self._on_timing = on_timing
        self._lock = threading.Lock()
        self._pending = 0
        self._dummy_hash: str | None = None

    @property
    def workers(self) -> int:
        return self._workers

    @property
    def pending(self) -> int:
        """Hashes and verifications submitted and not yet finished (queued or running)."""
        return self._pending

    @property
    def max_memory_kib(self) -> int:
        """The most memory argon2 can hold at once: every worker hashing."""
        return self._workers * self._hasher.memory_cost

    def _counted(self, work: Callable[[], _T]) -> _T:
        try:
            return work()
        finally:
            # Decremented in the worker thread, so a cancelled caller cannot make the count
            # drop while its hash is still burning CPU.
            with self._lock:
                self._pending -= 1

    async def _run(self, operation: str | None, work: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        with self._lock:
            self._pending += 1
        try:
            future = loop.run_in_executor(self._executor, self._counted, work)
        except BaseException:  # e.g. submitted after close(): the work will never run
            with self._lock:
                self._pending -= 1
            raise
        try:
            return await future
        finally:
            if operation is not None:
                self._report(operation, time.perf_counter() - started)

    def _report(self, operation: str, seconds: float) -> None:
        if self._on_timing is None:
            return
        try:
            self._on_timing(operation, seconds)
        except Exception:
            # Metrics must never fail a sign-in.
            _log.exception("hashing timing callback failed")

    async def start(self) -> None:
        """Make the dummy hash: a real hash of a random string, with the pool's parameters.

        argon2 rejects a malformed hash at once, so only a real hash costs what a real
        verification costs. Not reported to `on_timing`: it is start-up, not a request.
        """
        await self._dummy()

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            unguessable = secrets.token_urlsafe(32)
            self._dummy_hash = await self._run(None, lambda: self._hasher.hash(unguessable))
        return self._dummy_hash

    async def hash(self, password: str) -> str:
        normal = normalize_password(password)
        return await self._run("hash", lambda: self._hasher.hash(normal))

    def _verify_now(self, password_hash: str, normal: str) -> bool:
        try:
            return self._hasher.verify(password_hash, normal)
        except (VerificationError, InvalidHashError):
            return False

    async def verify(self, password_hash: str, password: str) -> bool:
        """True only for the right password; a wrong one or an unreadable hash is False."""
        normal = normalize_password(password)
        return await self._run("verify", lambda: self._verify_now(password_hash, normal))

    async def verify_dummy(self, password: str) -> None:
        """The work of a real verify, for an unknown email, so timing reveals nothing."""
        await self.verify(await self._dummy(), password)

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether the hash was made with other parameters than the pool's (or is unreadable)."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    def close(self) -> None:
        """Finish queued work and stop the threads."""
        self._executor.shutdown(wait=True)

    def __repr__(self) -> str:
        h = self._hasher
        return (
            f"HashingPool(workers={self._workers}, t={h.time_cost}, "
            f"m={h.memory_cost}KiB, p={h.parallelism})"
        )
