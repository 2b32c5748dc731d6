"""Password policy and the argon2id hashing pool."""

import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher, extract_parameters

from services import passwords
from services.errors import PasswordPolicyError
from services.passwords import (
    CONTEXT,
    HUGE_PAGES_TUNABLE,
    REPEATED,
    SEQUENTIAL,
    TOO_COMMON,
    HashingPool,
    PasswordPolicy,
    argon2_huge_pages,
    glibc_version,
    huge_pages_settings,
    load_common_passwords,
    make_hasher,
    malloc_hugetlb,
    normalize_password,
    transparent_huge_pages,
)
from tests.support.eventually import eventually

FIELD = "payload.password"
POLICY = PasswordPolicy()
CONTEXT_WORDS = ("alice.smith@bookshop.example", "Alice Smith")


def fast_hasher() -> PasswordHasher:
    return make_hasher(time_cost=1, memory_kib=8 * 1024, parallelism=1)


def problem(password: str, context: tuple[str, ...] = CONTEXT_WORDS) -> str:
    with pytest.raises(PasswordPolicyError) as caught:
        POLICY.check_new(password, field=FIELD, context=context)
    assert caught.value.field == FIELD
    assert password not in caught.value.problem
    return caught.value.problem


# --- the policy ---------------------------------------------------------------------------


def test_common_passwords_are_loaded_lower_cased_without_the_comment() -> None:
    common = load_common_passwords()
    assert len(common) > 10_000
    assert {"123456", "password", "qwerty"} <= common
    assert not any(word.startswith("#") for word in common)
    assert all(word == word.lower() for word in common)


@pytest.mark.parametrize(
    "password",
    [
        "correct horse battery staple",
        "purple monkey dishwasher",  # lower-case letters and spaces only
        "tangerinelighthouse",  # no digit, no symbol, no capital
        "Ünïcödé pässwörds wörk",
        "日本語のパスワードです。長いです",
    ],
)
def test_long_passphrases_without_composition_rules_are_accepted(password: str) -> None:
    POLICY.check_new(password, field=FIELD, context=CONTEXT_WORDS)
    POLICY.check_verifiable(password, field=FIELD)


def test_the_minimum_is_15_code_points_after_normalisation() -> None:
    POLICY.check_new("glacier tundra1", field=FIELD)
    assert problem("glacier tundra") == "must be at least 15 characters"
    # 14 characters that each expand under NFKC: the normalised form is what counts.
    POLICY.check_new("\ufb01" * 7 + "xylophonex", field=FIELD)


def test_combining_sequences_count_as_the_composed_characters() -> None:
    decomposed = "e\u0301" * 14  # 28 code points, 14 once composed
    assert problem(decomposed) == "must be at least 15 characters"


def test_the_maximum_is_128_code_points() -> None:
    base = "velvet thunder quarry "
    at_limit = (base * 6)[:128]
    POLICY.check_new(at_limit, field=FIELD)
    assert problem(at_limit + "z") == "must be at most 128 characters"


def test_the_byte_cap_limits_multibyte_passwords() -> None:
    # 4-byte characters in a scrambled order (in order they would be a run).
    emoji = "".join(chr(0x1F600 + (i * 7) % 80) for i in range(80))
    policy = PasswordPolicy(max_bytes=256)
    with pytest.raises(PasswordPolicyError) as caught:
        policy.check_new(emoji[:65], field=FIELD)
    assert caught.value.problem == "must be at most 256 bytes in UTF-8"
    policy.check_new(emoji[:64], field=FIELD)


def test_megabyte_passwords_are_refused_without_normalising() -> None:
    assert problem("x" * 1_000_000) == "must be at most 128 characters"


@pytest.mark.parametrize("password", ["passwordpassword", "QwertyQwertyQwerty", "iloveyou1"])
def test_common_passwords_and_their_repeats_are_refused(password: str) -> None:
    policy = PasswordPolicy(min_length=8)
    with pytest.raises(PasswordPolicyError) as caught:
        policy.check_new(password, field=FIELD)
    assert caught.value.problem == TOO_COMMON


def test_the_blocklist_is_case_insensitive_and_whole_password() -> None:
    policy = PasswordPolicy(min_length=4, blocklist=frozenset({"hunter2hunter2hunter2x"}))
    with pytest.raises(PasswordPolicyError) as caught:
        policy.check_new("Hunter2Hunter2Hunter2X", field=FIELD)
    assert caught.value.problem == TOO_COMMON
    policy.check_new("hunter2hunter2hunter2xy", field=FIELD)


@pytest.mark.parametrize(
    "password",
    [
        "aaaaaaaaaaaaaaaa",
        "abcabcabcabcabc",
        "XyZ12XyZ12XyZ12xyz12",
        "zq.zq.zq.zq.zq.zq",
        "ab" * 8 + "a",
    ],
)
def test_one_short_unit_repeated_is_refused(password: str) -> None:
    assert problem(password) == REPEATED


@pytest.mark.parametrize(
    "password",
    [
        "123456789012345",
        "0123456789012345678",
        "987654321098765",
        "abcdefghijklmnop",
        "ZYXWVUTSRQPONMLK",
        "qwertyuiopasdfgh",
        "uvwxyzabcdefghijk",
    ],
)
def test_runs_of_consecutive_characters_are_refused(password: str) -> None:
    assert problem(password) == SEQUENTIAL


@pytest.mark.parametrize(
    "password",
    [
        "alice.smith@bookshop.example",
        "my name is Alice and I read",
        "SMITHS make great furniture",
        "the bookshop on the corner",
        "Identity theft is not a joke",
        "\uff21\uff4c\uff49\uff43\uff45 rides a blue bike",  # full-width "Alice"
    ],
)
def test_passwords_containing_context_words_are_refused(password: str) -> None:
    assert problem(password) == CONTEXT


def test_context_words_shorter_than_four_characters_are_ignored() -> None:
    POLICY.check_new("bob walks his dog daily", field=FIELD, context=("bob@ex.io", "Bob"))


def test_problems_never_echo_the_password() -> None:
    for password in ("tiny", "x" * 200, "passwordpassword", "aaaaaaaaaaaaaaaa", "alicealicealice1"):
        with pytest.raises(PasswordPolicyError) as caught:
            POLICY.check_new(password, field=FIELD, context=CONTEXT_WORDS)
        assert password not in str(caught.value)
        assert password not in caught.value.problem


def test_verifiable_checks_only_the_upper_bounds() -> None:
    POLICY.check_verifiable("123456", field=FIELD)
    POLICY.check_verifiable("passwordpassword", field=FIELD)
    with pytest.raises(PasswordPolicyError, match="not accepted"):
        POLICY.check_verifiable("x" * 129, field=FIELD)
    with pytest.raises(PasswordPolicyError):
        POLICY.check_verifiable("\U0001f600" * 129, field=FIELD)


def test_every_password_accepted_at_set_time_stays_verifiable() -> None:
    password = ("e\u0301" * 64) + ("o\u0308" * 64)  # 256 code points, 128 once composed
    POLICY.check_new(password, field=FIELD)
    POLICY.check_verifiable(password, field=FIELD)


def test_normalisation_is_nfkc() -> None:
    assert normalize_password("\uff50\uff41\uff53\uff53") == "pass"
    assert normalize_password("e\u0301") == "\u00e9"
    assert normalize_password("\u2168") == "IX"


def test_the_policy_repr_does_not_dump_the_blocklist() -> None:
    assert "123456" not in repr(POLICY)


# --- the hashing pool ---------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[HashingPool]:
    hashing = HashingPool(fast_hasher(), workers=2)
    yield hashing
    hashing.close()


async def test_a_hash_verifies_with_the_same_password_only(pool: HashingPool) -> None:
    stored = await pool.hash("correct horse battery staple")
    assert stored.startswith("$argon2id$")
    assert await pool.verify(stored, "correct horse battery staple")
    assert not await pool.verify(stored, "correct horse battery stapler")


async def test_look_alike_input_verifies_alike(pool: HashingPool) -> None:
    stored = await pool.hash("caf\u00e9 au lait, s'il vous plait")
    assert await pool.verify(stored, "cafe\u0301 au lait, s'il vous plait")
    fullwidth = await pool.hash("\uff50\uff41\uff53\uff53phrase for testing")
    assert await pool.verify(fullwidth, "passphrase for testing")


@pytest.mark.parametrize("stored", ["", "not a hash", "$argon2id$v=19$m=8192,t=1,p=1$xx$yy"])
async def test_an_unreadable_hash_is_a_mismatch_not_an_error(
    pool: HashingPool, stored: str
) -> None:
    assert await pool.verify(stored, "whatever the password") is False


async def test_hashes_made_with_weaker_parameters_need_a_rehash(pool: HashingPool) -> None:
    weaker = HashingPool(make_hasher(1, 4 * 1024, 1), workers=1)
    try:
        old = await weaker.hash("a long enough passphrase")
    finally:
        weaker.close()
    assert pool.needs_rehash(old)
    assert not pool.needs_rehash(await pool.hash("a long enough passphrase"))
    assert pool.needs_rehash("garbage")


async def test_the_dummy_hash_is_real_and_uses_the_pool_parameters(pool: HashingPool) -> None:
    await pool.start()
    dummy = pool._dummy_hash
    assert dummy is not None
    params = extract_parameters(dummy)
    assert (params.time_cost, params.memory_cost, params.parallelism) == (1, 8192, 1)
    await pool.verify_dummy("anything at all")


async def test_verify_dummy_starts_the_pool_when_needed(pool: HashingPool) -> None:
    await pool.verify_dummy("anything at all")
    assert pool._dummy_hash is not None


async def test_an_unknown_email_costs_as_much_as_a_wrong_password() -> None:
    # Costly enough that argon2 dominates scheduling noise; the two are measured in turns so
    # that load from elsewhere on the machine falls on both alike.
    hashing = HashingPool(make_hasher(2, 32 * 1024, 1), workers=1)
    real: list[float] = []
    dummy: list[float] = []
    try:
        stored = await hashing.hash("the account's real password")
        await hashing.start()
        for _ in range(7):
            real.append(await seconds(hashing.verify(stored, "a wrong guess at it")))
            dummy.append(await seconds(hashing.verify_dummy("a wrong guess at it")))
    finally:
        hashing.close()
    assert 0.5 < statistics.median(dummy) / statistics.median(real) < 2.0


async def seconds(action: Awaitable[object]) -> float:
    started = time.perf_counter()
    await action
    return time.perf_counter() - started


async def test_timings_are_reported_per_operation() -> None:
    seen: list[tuple[str, float]] = []
    hashing = HashingPool(fast_hasher(), workers=1, on_timing=lambda op, s: seen.append((op, s)))
    try:
        await hashing.start()
        stored = await hashing.hash("a long enough passphrase")
        await hashing.verify(stored, "a long enough passphrase")
        await hashing.verify_dummy("someone else entirely")
    finally:
        hashing.close()
    assert [op for op, _ in seen] == ["hash", "verify", "verify"]
    assert all(seconds > 0 for _, seconds in seen)


async def test_a_failing_timing_callback_does_not_fail_the_hash() -> None:
    def broken(operation: str, seconds: float) -> None:
        raise RuntimeError("metrics are down")

    hashing = HashingPool(fast_hasher(), workers=1, on_timing=broken)
    try:
        assert (await hashing.hash("a long enough passphrase")).startswith("$argon2id$")
    finally:
        hashing.close()


class CountingHasher(PasswordHasher):
    """Counts how many hashes run at the same moment."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8 * 1024, parallelism=1)
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.release = threading.Event()

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            self.release.wait(timeout=5)
            return super().hash(password, salt=salt)
        finally:
            with self.lock:
                self.active -= 1


async def test_the_pool_never_runs_more_than_its_workers_at_once() -> None:
    hasher = CountingHasher()
    hashing = HashingPool(hasher, workers=3)
    try:
        jobs = [asyncio.ensure_future(hashing.hash(f"passphrase number {i}")) for i in range(12)]
        await eventually(lambda: hasher.active == 3, timeout=10, what="three hashes running")
        assert hashing.pending == 12
        assert hasher.active == 3
        hasher.release.set()
        await asyncio.gather(*jobs)
    finally:
        hashing.close()
    assert hasher.peak == 3
    assert hashing.pending == 0


def test_workers_default_to_the_cpu_count_and_bound_memory() -> None:
    hashing = HashingPool()
    try:
        assert hashing.workers == (os.cpu_count() or 1)
        assert hashing.max_memory_kib == hashing.workers * 65536
        assert "workers=" in repr(hashing)
    finally:
        hashing.close()


async def test_work_submitted_after_close_fails_and_is_not_counted() -> None:
    hashing = HashingPool(fast_hasher(), workers=1)
    hashing.close()
    with pytest.raises(RuntimeError):
        await hashing.hash("a long enough passphrase")
    assert hashing.pending == 0


def test_a_pool_needs_at_least_one_worker() -> None:
    with pytest.raises(ValueError, match="at least one"):
        HashingPool(fast_hasher(), workers=0)


def test_make_hasher_uses_argon2id_with_the_given_cost() -> None:
    params = extract_parameters(make_hasher(2, 19 * 1024, 1).hash("x"))
    assert params.type.name == "ID"
    assert (params.time_cost, params.memory_cost, params.parallelism) == (2, 19456, 1)
    assert (params.hash_len, params.salt_len) == (32, 16)


async def test_hashing_threads_run_at_the_requested_lower_priority() -> None:
    seen: list[int] = []

    class Recording(PasswordHasher):
        def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return super().hash(password, salt=salt)

    base = os.getpriority(os.PRIO_PROCESS, 0)
    pool = HashingPool(
        Recording(time_cost=1, memory_cost=8192, parallelism=1), workers=1, niceness=5
    )
    try:
        await pool.hash("a long enough passphrase for this")
    finally:
        pool.close()
    assert seen == [5]
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the event loop's thread is untouched


def test_the_hugetlb_tunable_is_read_as_glibc_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert malloc_hugetlb() is None
    monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}")
    assert malloc_hugetlb() == "1"
    monkeypatch.setenv("GLIBC_TUNABLES", f"{HUGE_PAGES_TUNABLE}:glibc.malloc.hugetlb=0")
    assert malloc_hugetlb() == "0"  # the last value given is the one glibc uses


def test_the_kernel_thp_mode_is_the_bracketed_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(passwords, "THP_MODE", mode)
    assert transparent_huge_pages() == "madvise"
    monkeypatch.setattr(passwords, "THP_MODE", tmp_path / "missing")
    assert transparent_huge_pages() is None


# Allocates argon2's default memory from a thread, as the hashing pool does, and says whether
# the mapping that holds it is marked for huge pages ("hg" in its VmFlags).
_MARKED_FOR_HUGE_PAGES = """
import ctypes, re, threading
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
got = []
thread = threading.Thread(target=lambda: got.append(libc.malloc(64 * 1024 * 1024)))
thread.start()
thread.join()
holds, flags = False, None
for line in open("/proc/self/smaps"):
    span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
    if span:
        holds = int(span[1], 16) <= got[0] < int(span[2], 16)
    elif holds and line.startswith("VmFlags:"):
        flags = line.split()
        break
print("not found" if flags is None else "hg" in flags)
"""


def _marked_for_huge_pages(tunables: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    done = subprocess.run(
        [sys.executable, "-c", _MARKED_FOR_HUGE_PAGES], env=env, capture_output=True, check=True
    )
    answer = done.stdout.strip()
    assert answer in (b"True", b"False"), answer  # the mapping holding the block was found
    return answer == b"True"


@pytest.mark.parametrize(
    ("glibc", "hugetlb", "thp_mode", "who"),
    [
        ("glibc 2.36", "1", "madvise", "glibc"),
        ("glibc 2.35", "1", "madvise", "glibc"),
        ("glibc 2.34", "1", "madvise", "none"),  # the tunable came with 2.35
        ("glibc 2.36", "0", "madvise", "none"),
        ("glibc 2.36", None, "madvise", "none"),
        ("glibc 2.36", "1", "always", "kernel"),  # glibc leaves it to the kernel
        ("glibc 2.36", None, "always", "kernel"),
        ("glibc 2.36", "1", "never", "none"),
        ("glibc 2.36", "1", None, "none"),  # no THP at all
        (None, "1", "madvise", "none"),  # another C library
        (None, None, "always", "kernel"),
    ],
)
def test_who_puts_argon2s_memory_on_huge_pages(
    glibc: str | None, hugetlb: str | None, thp_mode: str | None, who: str
) -> None:
    assert argon2_huge_pages(glibc, hugetlb, thp_mode) == who


def test_the_reported_settings_follow_the_kernels_thp_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mode = tmp_path / "enabled"
    mode.write_text("[always] madvise never\n")
    monkeypatch.setattr(passwords, "THP_MODE", mode)
    assert huge_pages_settings()["argon2_huge_pages"] == "kernel"
    mode.write_text("always madvise [never]\n")
    assert huge_pages_settings()["argon2_huge_pages"] == "none"


def test_the_tunable_marks_argon2s_memory_for_huge_pages_exactly_when_glibc_should() -> None:
    """What the Dockerfile and `make run` set, checked against the C library and the kernel
    this runs on: the mapping is marked when glibc is the one to do it (`madvise`), and not
    otherwise (`always` and `never` alike: under `always` the kernel needs no mark)."""
    glibc, thp_mode = glibc_version(), transparent_huge_pages()
    for tunables, hugetlb in ((None, None), (HUGE_PAGES_TUNABLE, "1")):
        expected = argon2_huge_pages(glibc, hugetlb, thp_mode) == "glibc"
        assert _marked_for_huge_pages(tunables) == expected, (glibc, thp_mode, tunables)
