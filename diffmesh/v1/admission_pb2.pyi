from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetCapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("concurrency", "max_queue", "in_flight")
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    concurrency: int
    max_queue: int
    in_flight: int
    def __init__(self, concurrency: _Optional[int] = ..., max_queue: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...
