"""Shorter polls and back-offs for flwr 1.39's hard-coded waits, in one version-checked place.

Flower 1.39 hard-codes the waits that dominate a dispatch on loopback (measured in
FLOWER-NOTES, "Where the time goes"):

- the SuperNode's idle poll of the SuperLink, ``time.sleep(3)`` in
  ``flwr.supernode.start_client_internal``, and its reply wait loops, ``time.sleep(0.5)``;
- the first back-off after an "object unavailable" answer when pulling a message's objects,
  ``PULL_INITIAL_BACKOFF = 1`` s, bound as the keyword default of ``pull_objects`` and
  ``pull_and_inflate_object_from_tree`` (SuperNode, ClientApp and ServerApp all pull that way).

One behaviour is mended as well: a reply that Flower's SuperNode loop would leave waiting after a
run was stopped mid-pull is sent at the next idle poll (:func:`flush_waiting_replies`).

Nothing here edits Flower's files. :func:`tune_supernode` replaces the ``time`` module that
``start_client_internal`` sees with a proxy whose ``sleep`` is capped, and
:func:`tune_object_pulls` changes the two functions' keyword defaults. Both refuse to touch
any other flwr version than :data:`TUNED_FLWR_VERSION` (they warn and do nothing), because the
constants they replace are only known to mean what they mean there. The SuperExec task poll
has an environment variable of its own (:data:`SUPEREXEC_POLL_ENV`); use that where it applies.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

TUNED_FLWR_VERSION = "1.39.0"
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
IDLE_POLL_ENV = "FLORIST_SUPERNODE_IDLE_POLL"
IDLE_POLL_MAX_ENV = "FLORIST_SUPERNODE_IDLE_POLL_MAX"
REPLY_POLL_ENV = "FLORIST_SUPERNODE_REPLY_POLL"
PULL_BACKOFF_ENV = "FLORIST_PULL_INITIAL_BACKOFF"


@dataclass(frozen=True)
class Tuning:
    """The waits Florist uses instead of flwr's (seconds)."""

    #: The SuperNode's wait between two idle polls of the SuperLink (flwr: 3 s). Every node
    #: sends one Fleet API request per interval, so many nodes on few cores want it longer.
    idle_poll: float = 0.2
    #: The idle poll once the node has had nothing to do for ``idle_grace_s``: it grows from
    #: ``idle_poll`` to this over ``idle_ramp_s``. An idle poll is a write on the SuperLink's
    #: state; 50 idle nodes at 0.2 s are 250 a second, enough to lock its SQLite file on 2
    #: cores, while work that follows work (the next round) is still picked up at once.
    idle_poll_max: float = 1.0
    idle_grace_s: float = 10.0
    idle_ramp_s: float = 20.0
    #: The SuperNode's wait while the ClientApp's reply is not there yet (flwr: 0.5 s).
    reply_poll: float = 0.02
    #: First back-off after "object unavailable" (flwr: 1 s); it doubles up to ``backoff_cap``.
    pull_initial_backoff: float = 0.02
    #: Longest back-off between two object pulls (flwr: 10 s).
    pull_backoff_cap: float = 2.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Tuning:
        """Defaults, overridden by ``FLORIST_SUPERNODE_IDLE_POLL`` and friends."""
        env = dict(os.environ if env is None else env)
        base = cls()

        def read(name: str, default: float) -> float:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            value = float(raw)
            if not 0.0 < value <= 60.0:
                raise ValueError(f"{name} must be in (0, 60] seconds, got {raw!r}")
            return value

        idle_poll = read(IDLE_POLL_ENV, base.idle_poll)
        return cls(
            idle_poll=idle_poll,
            idle_poll_max=max(idle_poll, read(IDLE_POLL_MAX_ENV, base.idle_poll_max)),
            reply_poll=read(REPLY_POLL_ENV, base.reply_poll),
            pull_initial_backoff=read(PULL_BACKOFF_ENV, base.pull_initial_backoff),
            pull_backoff_cap=base.pull_backoff_cap,
        )


def version_supported(version: str | None = None) -> bool:
    """Whether the installed (or given) flwr version is the one these patches were written for."""
    if version is None:
        import flwr

        version = flwr.__version__
    if version != TUNED_FLWR_VERSION:
        log.warning(
            "flwr %s is installed; Florist's poll tuning is written for %s and is skipped "
            "(Flower's own waits apply)",
            version,
            TUNED_FLWR_VERSION,
        )
        return False
    return True


# The idle poll and the reply waits are the only sleeps in start_client_internal (flwr 1.39):
# 3 s when the SuperLink had no message, 0.5 s while waiting for the ClientApp's reply.
_FLWR_IDLE_SLEEP = 3.0


class CappedSleep:
    """A stand-in for the ``time`` module whose ``sleep`` is shortened, everything else real.

    ``sleep(3)`` (flwr's idle poll) becomes ``idle``, or, once the node has been idle for
    ``grace`` seconds, a wait growing linearly to ``idle_max`` over ``ramp`` seconds; any other
    sleep (a reply wait: the node is working) is capped at ``other`` and counts as activity, as
    does :meth:`active` (called when a poll brings a message).
    """

    def __init__(
        self,
        *,
        idle: float,
        other: float,
        idle_max: float | None = None,
        grace: float = 10.0,
        ramp: float = 20.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle = idle
        self.idle_max = idle if idle_max is None else max(idle, idle_max)
        self.other = other
        self.grace, self.ramp = grace, ramp
        self._sleep = sleep
        self._clock = clock
        self._active_at = clock()

    def active(self) -> None:
        """The node has work: poll fast again."""
        self._active_at = self._clock()

    def idle_wait(self) -> float:
        """The idle poll now: ``idle`` within the grace period, then up to ``idle_max``."""
        quiet = self._clock() - self._active_at - self.grace
        if quiet <= 0 or self.idle_max <= self.idle:
            return self.idle
        share = 1.0 if self.ramp <= 0 else min(1.0, quiet / self.ramp)
        return self.idle + share * (self.idle_max - self.idle)

    def wait_for(self, seconds: float) -> float:
        """How long a requested ``sleep(seconds)`` actually sleeps."""
        if seconds >= _FLWR_IDLE_SLEEP:
            return min(seconds, self.idle_wait())
        self.active()
        return min(seconds, self.other)

    def sleep(self, seconds: float) -> None:
        self._sleep(self.wait_for(seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def tune_object_pulls(tuning: Tuning | None = None, *, version: str | None = None) -> bool:
    """Shorten the first back-off of Flower's object pulls in this process; False if skipped."""
    if not version_supported(version):
        return False
    tuning = tuning or Tuning.from_env()
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__
        if defaults is None or not {"initial_backoff", "backoff_cap"} <= defaults.keys():
            log.warning("%s has no back-off keywords; pull tuning skipped", fn.__qualname__)
            return False
        defaults["initial_backoff"] = tuning.pull_initial_backoff
        defaults["backoff_cap"] = tuning.pull_backoff_cap
    return True


def waiting_reply_run(state: object) -> int | None:
    """The run of a reply waiting in a SuperNode's state that nobody has taken to send, or None.

    Reads ``InMemoryNodeState``'s message store without marking anything retrieved (flwr 1.39's
    only NodeState; ``get_messages`` would mark what it returns as taken). None if the state
    does not look like that one.
    """
    store, lock = getattr(state, "msg_store", None), getattr(state, "lock_msg_store", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        for entry in store.values():
            message = getattr(entry, "message", None)
            if message is None or getattr(entry, "is_retrieved", True):
                continue
            if message.metadata.reply_to_message_id:
                return int(message.metadata.run_id)
    return None


def _note_activity() -> None:
    """A poll brought a message: the SuperNode's idle poll (if tuned) goes back to fast."""
    from flwr.supernode import start_client_internal as sci

    if isinstance(sci.time, CappedSleep):
        sci.time.active()


def flush_waiting_replies(pull: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap the SuperNode loop's message pull so that an idle poll also sends waiting replies.

    flwr 1.39's loop pulls one message, then sends every reply present. When a run stops while a
    message's objects are being pulled, the pull gives up with ``RunNotRunningException`` but
    leaves the message and its task in place (that exception is a ``BaseException``, which the
    pull's own clean-up does not catch); the ClientApp still answers it, and that reply waits
    unsent until the next message arrives, whose push stage then sends the stale reply in place
    of the new one and leaves the new reply queued until yet another message comes: a node
    seemingly silent for a whole round timeout. Reporting a waiting reply's run from an idle
    pull makes the loop's push stage send it at once.
    """
    if getattr(pull, "_florist_flushes", False):
        return pull

    def pull_or_flush(**kwargs: Any) -> int | None:
        run_id = pull(**kwargs)
        if run_id is None:
            return waiting_reply_run(kwargs.get("state"))
        _note_activity()
        return run_id

    pull_or_flush._florist_flushes = True  # type: ignore[attr-defined]
    return pull_or_flush


def tune_supernode(tuning: Tuning | None = None, *, version: str | None = None) -> bool:
    """Shorten the SuperNode's idle poll and reply waits, and its object pulls; False if skipped.

    Call it in the SuperNode's process before ``flower_supernode()`` runs.
    """
    if not version_supported(version):
        return False
    tuning = tuning or Tuning.from_env()
    from flwr.supernode import start_client_internal as sci

    current: ModuleType | CappedSleep = sci.time
    if not isinstance(current, CappedSleep | ModuleType):
        log.warning("flwr.supernode.start_client_internal.time is %r; not tuned", current)
        return False
    sci.time = CappedSleep(  # type: ignore[assignment]
        idle=tuning.idle_poll,
        other=tuning.reply_poll,
        idle_max=tuning.idle_poll_max,
        grace=tuning.idle_grace_s,
        ramp=tuning.idle_ramp_s,
    )
    # The loop calls it by keyword (state=..., receive=..., ...); see flush_waiting_replies.
    sci._pull_and_store_message = flush_waiting_replies(sci._pull_and_store_message)
    tune_object_pulls(tuning, version=version)
    log.info(
        "Flower waits tuned: idle poll %.2f s (%.2f s after %.0f s idle), reply wait %.2f s, "
        "first pull back-off %.2f s",
        tuning.idle_poll,
        tuning.idle_poll_max,
        tuning.idle_grace_s,
        tuning.reply_poll,
        tuning.pull_initial_backoff,
    )
    return True
