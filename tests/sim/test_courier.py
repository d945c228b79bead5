import pytest

from gateway.sim.courier import faults_to_json, update_faults
from gateway.sim.daraja import DarajaFaults
from gateway.sim.momo import MomoFaults


def test_knobs_change_from_json_including_nested_ones() -> None:
    """Top-level and nested knobs take JSON values of their own type."""
    faults = DarajaFaults()
    update_faults(faults, {"hold_prompts": True, "callbacks": {"copies": 3, "hold": True}})
    assert faults.hold_prompts
    assert (faults.callbacks.copies, faults.callbacks.hold) == (3, True)


def _tamper_amount(faults: MomoFaults) -> str | None:
    """The knob, read through a call (so the type checker does not keep an earlier narrowing)."""
    return faults.tamper_amount


def test_optional_knobs_take_null_or_their_type() -> None:
    """A knob that may be None accepts null and its own type, and nothing else."""
    faults = MomoFaults()
    update_faults(faults, {"tamper_amount": "0.01"})
    assert _tamper_amount(faults) == "0.01"
    update_faults(faults, {"tamper_amount": None})
    assert _tamper_amount(faults) is None
    with pytest.raises(ValueError, match="tamper_amount"):
        update_faults(faults, {"tamper_amount": 1})


@pytest.mark.parametrize(
    "changes",
    [
        {"hold_prompts": True, "no_such_knob": 1},
        {"hold_prompts": True, "query_errors": "3"},
        {"hold_prompts": True, "push_errors": True},
        {"hold_prompts": True, "callbacks": 1},
        {"callbacks": {"copies": 2, "hold": "yes"}},
    ],
)
def test_bad_changes_are_refused_whole(changes: dict[str, object]) -> None:
    """An unknown knob or a wrongly typed value refuses the whole change: nothing moves."""
    faults = DarajaFaults()
    before = faults_to_json(faults)
    with pytest.raises(ValueError):  # noqa: PT011 - the message is the knob's, tested above
        update_faults(faults, changes)
    assert faults_to_json(faults) == before
