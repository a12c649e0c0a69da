"""Store mutants: the hot statements, each with one guard removed or weakened.

A checker that no broken store can fail proves nothing. Each mutant edits
one named statement by replacing one fragment of its SQL (the fragment must
be there, so a change of the statement that would silently make a mutant a
no-op breaks the self-test instead). A mutant is applied only inside a
self-test pod process (``python -m fleetsim.selftest.pod``); no option or
environment variable of a production command can reach this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetsim.errors import ConfigError


@dataclass(frozen=True)
class Mutant:
    """One guard removed from one statement."""

    name: str
    statement: str  # the name in fleetsim.store.queries
    old: str  # the fragment that is the guard
    new: str  # what replaces it
    description: str
    # Why no client can observe it, for a mutant the checker cannot kill.
    equivalent: str | None = None


MUTANTS: dict[str, Mutant] = {m.name: m for m in (
    Mutant(
        "complete-without-token", "COMPLETE",
        "AND s.claim_token = input.token AND", "AND",
        "a completion is accepted whatever claim token it carries",
    ),
    Mutant(
        "claim-without-lock", "CLAIM",
        "FOR UPDATE OF s SKIP LOCKED", "",
        "the claim neither locks nor skips locked rows: two pods can claim one step",
    ),
    Mutant(
        "recover-without-term", "RECOVER",
        "WHERE id = 1 AND holder = :pod AND term = :term\n       AND expires_at > "
        "statement_timestamp()\n       FOR SHARE",
        "WHERE id = 1 AND CAST(:term AS bigint) IS NOT NULL AND CAST(:pod AS text) IS NOT NULL",
        "recovery runs whatever lease its caller holds (a deposed leader keeps recovering)",
    ),
    Mutant(
        "renew-without-expiry", "RENEW_LEASE",
        "AND term = :term AND expires_at > statement_timestamp()", "AND term = :term",
        "a leader may renew a lease that has already run out",
        equivalent=(
            "a lease that ran out can be renewed only if no other pod took it meanwhile"
            " (acquire and renew update the same row, so one waits for the other and"
            " re-checks): no two terms overlap, and every leader action re-checks the"
            " expiry itself, so nothing was decided in the gap"
        ),
    ),
    Mutant(
        "requeue-without-attempt", "RECOVER",
        "SET attempts = s.attempts + 1,", "SET attempts = s.attempts,",
        "recovery requeues a dead pod's step without spending an attempt",
    ),
    Mutant(
        "release-leaves-claimed", "RELEASE",
        "SET status = CASE WHEN s.cancel_requested THEN 'cancelled' ELSE 'queued' END,",
        "SET status = 'claimed',",
        "a release ends the attempt but leaves the step claimed (by nobody)",
    ),
)}


def parse_mutants(spec: str) -> list[Mutant]:
    """``all`` or a comma-separated list of mutant names."""
    if spec.strip() == "all":
        return list(MUTANTS.values())
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in MUTANTS]
    if unknown or not names:
        raise ConfigError(
            f"unknown mutant {', '.join(unknown) or '(none given)'}: expected all or some of "
            + ", ".join(MUTANTS))
    return [MUTANTS[n] for n in names]


def apply_mutant(name: str) -> Mutant:
    """Break this process's store: replace the mutant's fragment in its statement.

    Patches :mod:`fleetsim.store.queries` and the prepared statements of
    :mod:`fleetsim.store.store`, before any connection prepares them.
    """
    from fleetsim.store import queries
    from fleetsim.store import store as store_module

    mutant = MUTANTS[name]
    sql = getattr(queries, mutant.statement)
    if mutant.old not in sql:
        raise ConfigError(f"mutant {name}: its guard is no longer in {mutant.statement}")
    broken = sql.replace(mutant.old, mutant.new)
    setattr(queries, mutant.statement, broken)
    # The hot statements are prepared once at import: rebuild the broken one.
    hot = _PREPARED.get(mutant.statement)
    if hot is not None:
        setattr(store_module, hot, store_module._prepared(getattr(store_module, hot).name,
                                                          broken))
        store_module._HOT = tuple(getattr(store_module, a) for a in _PREPARED.values())
    return mutant


# The statements Store prepares (fleetsim.store.store), by their name in queries.
_PREPARED = {"CLAIM": "_CLAIM", "COMPLETE": "_COMPLETE", "FAIL": "_FAIL",
             "RELEASE": "_RELEASE", "HEARTBEAT": "_HEARTBEAT"}
