"""What every parser shares: the errors a row raises (:class:`BadRow`, :class:`Filtered`) and
checked access to a raw record's fields."""

from __future__ import annotations

from typing import Any

from dpo.data.sources import PreferenceRow


class BadRow(ValueError):
    """A row that cannot be used. ``reason`` is a short key for counting, the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Filtered(BadRow):
    """A row left out on purpose by the configuration; counted, never an error."""


def get_field(record: Any, key: str) -> Any:
    """``record[key]``; a record that is not an object, or lacks the key, is a :class:`BadRow`."""
    if not isinstance(record, dict):
        raise BadRow("not_an_object", f"expected an object with fields, got {type(record).__name__}")
    if key not in record:
        raise BadRow("missing_field", f"missing field {key!r} (fields present: {sorted(record)})")
    return record[key]


def text_field(record: Any, key: str, *, allow_empty: bool = False) -> str:
    """A string field: null, another type or (unless ``allow_empty``) blank text is a :class:`BadRow`."""
    value = get_field(record, key)
    if value is None:
        raise BadRow("null_field", f"field {key!r} is null")
    if not isinstance(value, str):
        raise BadRow("not_a_string", f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow("empty_text", f"field {key!r} is empty")
    return value


def new_row(prompt: str, chosen: str, rejected: str | None, where: str) -> PreferenceRow:
    """A :class:`PreferenceRow`; an empty response is a :class:`BadRow`."""
    if not chosen.strip() or (rejected is not None and not rejected.strip()):
        raise BadRow("empty_response", "a response is empty")
    return PreferenceRow(prompt, chosen, rejected, where)
