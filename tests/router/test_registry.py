"""router.registry: resolution (the default version), status aggregation, signatures."""

from __future__ import annotations


import pytest

from shared.errors import InvalidArgument, NotFound, Unavailable
from router.registry import Registry
from router.pool import DEAD, LOADING, READY
from tests.router.pools import AVAILABLE, END, LOADING_V, State, backend, config, make_pool, spec, vstatus





# -- resolve -------------------------------------------------------------------------------------


def resolver(aspire: tuple[int, ...] = (1, 2, 3, 4)) -> Registry:
    a = backend("a", {"m": {1: AVAILABLE, 2: AVAILABLE, 3: LOADING_V}})
    b = backend("b", {"m": {3: AVAILABLE}}, state=DEAD)
    c = backend("c", {"m": {2: AVAILABLE}})
    cfg = config({"name": "m", "base_path": "/m", "version_labels": {"stable": 1, "canary": 4, "gone": 9}},
                 {"name": "empty", "base_path": "/e"})
    control = Registry(cfg, make_pool(a, b, c))
    control.aspired = {"m": aspire, "empty": ()}
    return control


def test_resolve_unversioned_is_the_default_version_not_the_highest() -> None:
    control = resolver()
    control.switch("m", 1)
    assert control.resolve(spec()) == 1  # 2 is available too: only a switch moves unversioned traffic
    control.switch("m", 3)
    with pytest.raises(Unavailable, match="no version available right now"):
        control.resolve(spec())  # 3 is only on a dead worker or still loading: never another version instead
    control.pool.by_name("b").state = READY
    assert control.resolve(spec()) == 3


def test_switch_records_when() -> None:
    now = [100.0]
    control = Registry(config(), make_pool(), clock=lambda: now[0])
    control.switch("m", 1)
    now[0] = 105.0
    control.switch("m", 1)  # no change, no new time
    assert control.switched_at == {"m": 100.0} and control.default == {"m": 1}


def test_resolve_explicit_version() -> None:
    control = resolver()
    assert control.resolve(spec(version=1)) == 1
    with pytest.raises(Unavailable, match="version 3 of model m"):
        control.resolve(spec(version=3))  # aspired, loading
    with pytest.raises(NotFound, match=r"Specific\(m, 7\)"):
        control.resolve(spec(version=7))


def test_resolve_labels() -> None:
    control = resolver()
    assert control.resolve(spec(label="stable")) == 1
    with pytest.raises(Unavailable):
        control.resolve(spec(label="canary"))  # names aspired version 4, not loaded anywhere
    with pytest.raises(NotFound):
        control.resolve(spec(label="gone"))
    with pytest.raises(InvalidArgument, match="Unrecognized servable version label: beta"):
        control.resolve(spec(label="beta"))


def test_resolve_unknown_model_is_not_found() -> None:
    with pytest.raises(NotFound, match=r"Latest\(nope\)"):
        resolver().resolve(spec("nope"))
    with pytest.raises(NotFound):
        resolver().resolve(spec("nope", version=1))


def test_resolve_latest_with_nothing_available() -> None:
    control = resolver()
    with pytest.raises(NotFound, match=r"Latest\(empty\)"):
        control.resolve(spec("empty"))  # nothing on disk either
    control.aspired["empty"] = (1,)
    with pytest.raises(Unavailable, match="no version available right now"):
        control.resolve(spec("empty"))


def test_ready_needs_every_models_default_on_a_worker_in_rotation() -> None:
    control = resolver()
    control.switch("m", 2)
    assert not control.ready()  # "empty" has no default yet
    c = control.pool.by_name("c")
    c.versions = {**c.versions, "empty": {1: vstatus(1)}}  # versions are replaced, never mutated
    control.switch("empty", 1)
    assert control.ready()
    control.switch("m", 3)
    assert not control.ready()  # 3 only on a dead worker


def test_failed_version_is_reported_end_with_its_error() -> None:
    control = resolver()
    control.failed[("m", 4)] = (9, "warm-up of m version 4 failed: non-finite output")
    control.failed[("m", 1)] = (13, "ignored: version 1 is AVAILABLE on a worker")
    got = {s.version: (s.state, s.status.error_code, s.status.error_message)
           for s in control.status(spec()).model_version_status}
    assert got[4] == (END, 9, "warm-up of m version 4 failed: non-finite output")
    assert got[1] == (AVAILABLE, 0, "")


# -- status aggregation ------------------------------------------------------------------------------


def status_control() -> Registry:
    a = backend("a")
    a.versions = {"m": {1: vstatus(1), 2: vstatus(2, END, "load failed on a"),
                        3: vstatus(3, END, "load failed"), 4: vstatus(4, END, "broken")}}
    b = backend("b", state=LOADING)
    b.versions = {"m": {2: vstatus(2), 3: vstatus(3, LOADING_V)}}
    dead = backend("dead", state=DEAD)
    dead.versions = {"m": {4: vstatus(4), 5: vstatus(5)}}
    cfg = config({"name": "m", "base_path": "/m", "version_labels": {"stable": 2, "old": 7}},
                 {"name": "n", "base_path": "/n"})
    return Registry(cfg, make_pool(a, b, dead))


def test_status_aggregates_over_workers() -> None:
    resp = status_control().status(spec())
    got = {s.version: (State.State.Name(s.state), s.status.error_message) for s in resp.model_version_status}
    assert got == {
        1: ("AVAILABLE", ""),
        2: ("AVAILABLE", ""),  # available on b wins over a's failure
        3: ("LOADING", ""),  # still loading on b: not an error yet
        4: ("END", "broken"),  # nobody has it better (the dead worker does not count)
    }
    assert [s.version for s in resp.model_version_status] == [1, 2, 3, 4]


def test_status_of_one_version() -> None:
    control = status_control()
    only = control.status(spec(version=4)).model_version_status
    assert [(s.version, s.state, s.status.error_message) for s in only] == [(4, END, "broken")]
    assert [s.version for s in control.status(spec(label="stable")).model_version_status] == [2]
    with pytest.raises(NotFound, match="version 5 of model m"):
        control.status(spec(version=5))  # only the dead worker had it
    with pytest.raises(NotFound, match="version 7"):
        control.status(spec(label="old"))
    with pytest.raises(InvalidArgument, match="label: new"):
        control.status(spec(label="new"))


def test_status_unknown_or_unloaded_model() -> None:
    control = status_control()
    with pytest.raises(NotFound, match="any versions of model nope"):
        control.status(spec("nope"))
    with pytest.raises(NotFound, match="any versions of model n"):
        control.status(spec("n"))


