"""The bad-input list, end to end: every case ends in one line or a success, never a traceback (slow: ~2 min)."""

import pytest

from tests import fault_injection


@pytest.mark.slow
def test_every_bad_input_case_holds(capsys):
    assert fault_injection.main([]) == 0, capsys.readouterr().out


def test_every_case_has_a_unique_name_and_an_expected_end():
    names = [c.name for c in fault_injection.CASES]
    assert len(names) == len(set(names)) and all(c.expect in ("error", "ok") for c in fault_injection.CASES)
