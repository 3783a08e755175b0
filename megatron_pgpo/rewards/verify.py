"""Answer equivalence with math-verify, in-process or in a pool of killable worker processes.

``answers_match(pred, gold)`` decides whether an extracted answer equals the ground truth:

1. a ground truth that names an option letter (``C``, ``(C)``, ``\\text{C}``, ``Option C``; upper case, so that a
   gold ``e`` or ``x`` stays maths) is compared letter-to-letter with the prediction, case-insensitively;
2. equal whitespace-collapsed strings match without calling math-verify (the fast path);
3. two plain numbers are compared exactly as decimals (``3.00`` == ``3``, ``1,000`` == ``1000``);
4. everything else goes to math-verify, both sides wrapped as ``\\boxed{...}``: math-verify 0.9 parses bare
   ``x=3`` as the number ``3`` and bare ``2^{10}`` as ``2`` (its plain-expression extractor), but inside a box it
   parses the whole LaTeX (``Eq(x, 3)``, ``2**10``), and ``verify(gold, pred)`` then accepts ``x=3`` for ``3``.

math-verify bounds its own time with ``signal.alarm``, which works only in the main thread (elsewhere ``parse``
raises ValueError), has one-second granularity, applies per call (gold parse, prediction parse and each compared
pair: up to ~6x the limit in all), and cannot interrupt a C extension. So ``answers_match`` uses those alarms in
the main thread, disables them elsewhere (no limit at all there), and ``VerifierPool`` adds the limit nothing can
break: each sample runs in a worker process that is SIGKILLed at its wall-clock deadline and replaced.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait

from ..faults import act_on_reward_marker
from .answer import canonical_text, normalize_choice, normalize_number

DEFAULT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Outcome:
    """Result of one comparison. ``timed_out`` samples are always ``matched=False``."""

    matched: bool
    timed_out: bool = False
    error: str | None = None  # exception type name or worker failure; the sample then counts as not matched


def _gold_choice(gold: str) -> str | None:
    letter = normalize_choice(gold)
    # Only an upper-case letter makes the label multiple choice; a lower-case one (e, i, x) is maths.
    return letter if letter is not None and letter in gold else None


def quick_match(pred: str, gold: str) -> bool | None:
    """The decision of the cheap rules (choice letters, equal strings, plain numbers), or None if math-verify must decide."""
    if not pred.strip() or not gold.strip():
        return False
    letter = _gold_choice(gold)
    if letter is not None:
        return normalize_choice(pred) == letter
    if canonical_text(pred) == canonical_text(gold):
        return True
    pred_num, gold_num = normalize_number(pred), normalize_number(gold)
    if pred_num is not None and gold_num is not None:
        return pred_num == gold_num
    return None


def match_outcome(pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Outcome:
    """Compare in this process (see the module docstring for the time limit); never raises for any string input."""
    try:
        decided = quick_match(pred, gold)
        if decided is not None:
            return Outcome(decided)
        return _math_verify_match(pred, gold, timeout_s)
    except Exception as exc:  # noqa: BLE001 - a reward must never crash the trainer
        return Outcome(False, error=type(exc).__name__)


def answers_match(pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True iff ``pred`` is equivalent to ``gold``, decided in this process (math-verify alarms in the main thread)."""
    return match_outcome(pred, gold, timeout_s).matched


def _math_verify_match(pred: str, gold: str, timeout_s: float) -> Outcome:
    from math_verify import parse, verify  # imported lazily: sympy costs ~0.5 s and only workers need it
    from math_verify.errors import TimeoutException

    # signal.alarm takes whole seconds and raises ValueError off the main thread; None disables it there.
    in_main = threading.current_thread() is threading.main_thread()
    limit = max(1, math.ceil(timeout_s)) if in_main else None
    try:
        # raise_on_error=True so that a timeout is reported as one instead of looking like "no answer".
        gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=limit, raise_on_error=True)
        pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=limit, raise_on_error=True)
        if not gold_parsed or not pred_parsed:
            return Outcome(False)
        return Outcome(bool(verify(gold_parsed, pred_parsed, timeout_seconds=limit, raise_on_error=True)))
    except TimeoutException:  # a BaseException in math-verify, so not caught by `except Exception` callers
        return Outcome(False, timed_out=True)


def _worker_main(conn) -> None:
    """Worker loop: answer ``(index, pred, gold, timeout_s)`` with ``(index, matched, timed_out, error)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us on close
    _math_verify_match("1", "1", DEFAULT_TIMEOUT_S)  # import sympy and compile math-verify's regexes before "ready"
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if msg is None:
            return
        index, pred, gold, timeout_s = msg
        act_on_reward_marker(pred)  # fault injection (faults.py): hang or die on its marker, else nothing
        try:
            out = match_outcome(pred, gold, timeout_s)
        except BaseException as exc:  # noqa: BLE001 - only our own SystemExit-like surprises land here
            out = Outcome(False, error=type(exc).__name__)
        conn.send((index, out.matched, out.timed_out, out.error))


class _Worker:
    def __init__(self, ctx, startup_timeout_s: float):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="reward-verifier")
        self.proc.start()
        child.close()  # so that recv() sees EOF if the worker dies
        self.ready = False
        self.deadline = time.monotonic() + startup_timeout_s  # startup deadline until ready, then per-sample
        self.task: tuple[int, int] | None = None  # (sample index, attempt)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class VerifierPool:
    """``num_workers`` persistent processes that run ``match_outcome`` under a hard wall-clock limit per sample.

    ``match_many`` hands one pair at a time to each idle worker and waits on all pipes at once; a worker still busy
    ``timeout_s`` seconds after it got its sample is SIGKILLed and replaced, and that sample is recorded as
    ``Outcome(False, timed_out=True)``. A worker that dies (segfault, OOM kill) is replaced and its sample retried
    once, then recorded as not matched. So every call returns one Outcome per pair, whatever the strings hold.

    Workers use the "forkserver" (default) or "spawn" start method, never "fork": the trainer may hold torch or
    NCCL threads, and a forked copy of their locks can deadlock. They start on the first ``match_many`` (each
    imports sympy, ~0.5-1 s) and are daemons, so they die with the parent; ``close()`` (or ``with``) stops them
    earlier, and a later call starts fresh ones. As with any spawn-based pool, the main script needs an
    ``if __name__ == "__main__":`` guard. Not thread-safe: use one pool per thread.

    ``num_workers=0`` compares in the calling process with math-verify's own alarms only (main thread: roughly
    whole seconds per parse/compare step; other threads: no limit at all). Meant for tests and debugging.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        mp_context: str = "forkserver",
        startup_timeout_s: float = 60.0,
        max_start_failures: int = 3,
    ):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0 (0 = in-process, no hard limit), got {num_workers!r}")
        if not timeout_s > 0:  # also rejects NaN
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        if mp_context not in ("forkserver", "spawn"):
            raise ValueError(
                f"mp_context must be 'forkserver' or 'spawn' ('fork' is unsafe with torch threads), got {mp_context!r}"
            )
        if mp_context not in mp.get_all_start_methods():
            raise ValueError(f"start method {mp_context!r} is not available on this platform; use 'spawn'")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0 seconds, got {startup_timeout_s!r}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.mp_context = mp_context
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_start_failures = max_start_failures
        self._workers: list[_Worker] = []

    def _new_worker(self) -> _Worker:
        return _Worker(mp.get_context(self.mp_context), self.startup_timeout_s)

    def match_many(self, pairs: list[tuple[str, str]]) -> list[Outcome]:
        """One Outcome per ``(pred, gold)`` pair, in order."""
        pairs = list(pairs)
        if self.num_workers == 0:
            return [match_outcome(pred, gold, self.timeout_s) for pred, gold in pairs]
        if not self._workers:
            self._workers = [self._new_worker() for _ in range(self.num_workers)]
        results: list[Outcome | None] = [None] * len(pairs)
        pending = deque((i, 0) for i in range(len(pairs)))  # (sample index, attempt)
        start_failures = 0
        workers = self._workers
        try:
            while pending or any(w.task is not None for w in workers):
                for k, w in enumerate(workers):
                    if pending and w.ready and w.task is None:
                        i, attempt = pending.popleft()
                        try:
                            w.conn.send((i, pairs[i][0], pairs[i][1], self.timeout_s))
                        except (OSError, ValueError):  # died while idle: retry on its replacement
                            pending.appendleft((i, attempt))
                            w.kill()
                            workers[k] = self._new_worker()
                            continue
                        w.task = (i, attempt)
                        w.deadline = time.monotonic() + self.timeout_s
                waiting = {w.conn: k for k, w in enumerate(workers) if w.task is not None or not w.ready}
                delay = max(0.0, min(workers[k].deadline for k in waiting.values()) - time.monotonic())
                for conn in wait(list(waiting), delay):
                    k = waiting[conn]
                    w = workers[k]
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):  # the worker died
                        if w.task is None:
                            start_failures += 1
                        else:
                            i, attempt = w.task
                            if attempt == 0:
                                pending.appendleft((i, 1))
                            else:
                                results[i] = Outcome(False, error="worker died")
                        w.kill()
                        workers[k] = self._new_worker()
                        continue
                    if msg == "ready":
                        w.ready = True
                        start_failures = 0
                    elif w.task is not None and isinstance(msg, tuple) and msg[0] == w.task[0]:
                        results[msg[0]] = Outcome(bool(msg[1]), bool(msg[2]), msg[3])
                        w.task = None
                now = time.monotonic()
                for k, w in enumerate(workers):
                    if (w.task is not None or not w.ready) and now >= w.deadline:
                        if w.task is None:
                            start_failures += 1
                        else:
                            results[w.task[0]] = Outcome(False, timed_out=True)
                        w.kill()
                        workers[k] = self._new_worker()
                if start_failures > self.max_start_failures:
                    raise RuntimeError(
                        f"reward verifier workers failed to start {start_failures} times in a row "
                        f"(startup_timeout_s={self.startup_timeout_s}); check that `python -c 'import math_verify'` "
                        "works in this environment, raise startup_timeout_s, or use num_workers=0"
                    )
        finally:
            # Interrupted mid-batch (Ctrl-C, the error above): busy workers would answer stale samples later.
            for k, w in enumerate(workers):
                if w.task is not None:
                    w.kill()
                    workers[k] = self._new_worker()
        return results  # type: ignore[return-value]  # every index is filled before the loop ends

    def close(self) -> None:
        """Stop the workers (politely, then SIGKILL); a later ``match_many`` starts new ones."""
        workers, self._workers = self._workers, []
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in workers:
            w.proc.join(timeout=1)
            w.kill()

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down what close() needs
            pass
