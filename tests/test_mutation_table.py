"""Issue 18's table of one-line changes still names code and tests that exist: a refactor that
moves such a line fails here, in ``make test``, not at the next ``make mutation-table``."""

from __future__ import annotations

import pytest

from tests.mutation_table import CHANGES, ROOT, Change


@pytest.mark.parametrize("change", CHANGES, ids=lambda change: change.name)
def test_each_change_of_the_table_applies_once_and_names_a_test_that_exists(
    change: Change,
) -> None:
    assert (ROOT / change.path).read_text().count(change.old) == 1, change.old
    for test in change.tests:
        path, _, name = test.partition("::")
        function = name.split("[")[0]
        assert f"def {function}(" in (ROOT / path).read_text(), test
