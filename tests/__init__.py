"""Ferry's tests. Helpers in tests.support assert too: pytest rewrites their asserts as it
does in test modules, so a failing check there explains itself."""

import pytest

pytest.register_assert_rewrite("tests.support")
