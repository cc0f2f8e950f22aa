"""Typed messages <-> Flower records: one generic codec for every dataclass in `messages`.

A message dataclass maps onto a `RecordDict` field by field:

- `str`, `int`, `float`, `bool`, `bytes`, `list[int]`, `list[float]`, `list[str]`: one key of
  the scalars record (`ConfigRecord` "config", or `MetricRecord` "metrics" for replies that a
  Flower strategy aggregates);
- `Arrays` (`dict[str, np.ndarray]`): an `ArrayRecord` named after the field;
- `ArraysById` (`dict[int, np.ndarray]`): the same, keyed by the id's decimal string;
- `Optional[...]` of any of these: omitted when `None`.

Decoding checks that every required field is there with its type, and that nothing else is: an
unknown record, key or wrong type raises `ProtocolError` naming it. Semantic checks live in each
message's `check()`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Union

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

Arrays = dict[str, np.ndarray]
ArraysById = dict[int, np.ndarray]
CONFIG, METRICS = "config", "metrics"
_SCALARS = (str, int, float, bool, bytes)
_LISTS = {list[int]: int, list[float]: float, list[str]: str}


class ProtocolError(ValueError):
    """A message does not follow the wire contract (missing, unknown or mistyped content)."""


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _is_arrays(hint: Any) -> bool:
    return hint in (Arrays, ArraysById)


def _check_scalar(name: str, value: Any, hint: Any) -> Any:
    if hint in _LISTS:
        item = _LISTS[hint]
        if not isinstance(value, list):
            raise ProtocolError(
                f"'{name}': expected a list of {item.__name__}, got {type(value).__name__}"
            )
        return [_check_scalar(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ProtocolError(f"'{name}': expected {hint.__name__}, got {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True)
class WireMessage:
    """Base of every request and reply: `to_content()` and `from_content()` / `from_message()`."""

    TYPE: ClassVar[str] = ""  # the Flower message type of the request this belongs to
    SCALARS: ClassVar[str] = CONFIG  # the record that holds the non-array fields

    def check(self) -> None:
        """Semantic validation beyond types; raise `ProtocolError`. Override where needed."""

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    def to_content(self, validate: bool = True) -> RecordDict:
        """The message as a `RecordDict`, validated first (`validate=False` only to build
        malformed messages in tests)."""
        if validate:
            self.check()
        scalars: dict[str, Any] = {}
        content = RecordDict()
        for name, hint in self._hints().items():
            value = getattr(self, name)
            hint, _ = _unwrap_optional(hint)
            if value is None:
                continue
            if _is_arrays(hint):
                content[name] = ArrayRecord(
                    {str(k): Array(np.ascontiguousarray(v)) for k, v in value.items()}
                )
            else:
                scalars[name] = value
        if scalars:
            record = MetricRecord(scalars) if self.SCALARS == METRICS else ConfigRecord(scalars)
            content[self.SCALARS] = record
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> typing.Self:
        """Decode and validate a `RecordDict`; `ProtocolError` on anything off-contract."""
        hints = cls._hints()
        array_fields = {n for n, h in hints.items() if _is_arrays(_unwrap_optional(h)[0])}
        records = set(content.keys())
        unknown = records - array_fields - {cls.SCALARS}
        if unknown:
            raise ProtocolError(f"{cls.__name__}: unknown records {sorted(unknown)}")
        for name in records & array_fields:
            if name not in content.array_records:
                raise ProtocolError(f"{cls.__name__}: record '{name}' must be an ArrayRecord")
        scalars = dict(content[cls.SCALARS]) if cls.SCALARS in records else {}
        extra = set(scalars) - (set(hints) - array_fields)
        if extra:
            raise ProtocolError(f"{cls.__name__}: unknown keys {sorted(extra)}")
        values: dict[str, Any] = {}
        for name, raw_hint in hints.items():
            hint, optional = _unwrap_optional(raw_hint)
            present = name in (content.array_records if name in array_fields else scalars)
            if not present:
                if optional:
                    values[name] = None
                    continue
                raise ProtocolError(f"{cls.__name__}: missing '{name}'")
            if name in array_fields:
                values[name] = _decode_arrays(name, content[name], by_id=hint == ArraysById)
            else:
                values[name] = _check_scalar(name, scalars[name], hint)
        message = cls(**values)
        message.check()
        return message

    @classmethod
    def from_message(cls, message: Message) -> typing.Self:
        """Decode a received message (its content; an error reply raises `ProtocolError`)."""
        if message.has_error():
            raise ProtocolError(f"error reply: {message.error.reason}")
        return cls.from_content(message.content)


def _decode_arrays(name: str, record: ArrayRecord, by_id: bool) -> dict[Any, np.ndarray]:
    out: dict[Any, np.ndarray] = {}
    for key, array in record.items():
        if by_id:
            if not key.isdigit():
                raise ProtocolError(f"'{name}': key '{key}' is not a non-negative integer id")
            out[int(key)] = array.numpy()
        else:
            out[key] = array.numpy()
    return out
