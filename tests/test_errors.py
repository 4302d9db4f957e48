"""User-facing errors: ConfigError is also a ValueError, as torch's and timm's bad-argument errors are."""

import pytest

from ummae.errors import ConfigError, UmmaeError
from ummae.masking import UniformMasking


def test_bad_argument_is_caught_by_except_value_error():
    with pytest.raises(ValueError, match="even"):
        UniformMasking((15, 16))
    try:
        UniformMasking((15, 16))
    except ValueError as e:  # what a user of torch/timm would write
        assert isinstance(e, ConfigError) and isinstance(e, UmmaeError)


def test_other_user_errors_are_not_value_errors():
    # Negative control: only bad configuration values are ValueErrors, not every UmmaeError
    # (a missing file, for instance).
    assert not issubclass(UmmaeError, ValueError)
