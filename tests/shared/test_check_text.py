"""Prompt text check: refuses exactly the control characters (Unicode Cc, Cs) but tab and newline."""

from __future__ import annotations

import sys
import unicodedata

import pytest

from shared.errors import InvalidInput
from shared.spec import check_text


def test_check_text_refuses_exactly_the_control_and_surrogate_code_points_but_tab_and_newline() -> None:
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        refused = ch not in "\t\n" and unicodedata.category(ch) in ("Cc", "Cs")
        if refused:
            with pytest.raises(InvalidInput, match="control character"):
                check_text("prompt", f"a{ch}b")
        else:
            assert check_text("prompt", f"a{ch}b") == f"a{ch}b"
