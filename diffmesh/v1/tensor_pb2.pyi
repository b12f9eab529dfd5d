from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "last")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    last: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "step", "total_steps", "fraction")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total_steps: int
    fraction: float
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., fraction: _Optional[float] = ...) -> None: ...

class MediaChunk(_message.Message):
    __slots__ = ("index", "mime_type", "data", "last")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    index: int
    mime_type: str
    data: bytes
    last: bool
    def __init__(self, index: _Optional[int] = ..., mime_type: _Optional[str] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class ModelLimits(_message.Message):
    __slots__ = ("family", "task", "size_multiple", "max_side", "frame_multiple", "max_frames", "default_width", "default_height", "default_frames", "default_steps", "default_guidance_scale", "default_fps", "true_cfg", "guidance_embedding", "needs_image", "max_sequence_length", "experts", "accepts_image")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    FRAME_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FPS_FIELD_NUMBER: _ClassVar[int]
    TRUE_CFG_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    NEEDS_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_IMAGE_FIELD_NUMBER: _ClassVar[int]
    family: str
    task: str
    size_multiple: int
    max_side: int
    frame_multiple: int
    max_frames: int
    default_width: int
    default_height: int
    default_frames: int
    default_steps: int
    default_guidance_scale: float
    default_fps: int
    true_cfg: bool
    guidance_embedding: bool
    needs_image: bool
    max_sequence_length: int
    experts: int
    accepts_image: bool
    def __init__(self, family: _Optional[str] = ..., task: _Optional[str] = ..., size_multiple: _Optional[int] = ..., max_side: _Optional[int] = ..., frame_multiple: _Optional[int] = ..., max_frames: _Optional[int] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., default_frames: _Optional[int] = ..., default_steps: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., default_fps: _Optional[int] = ..., true_cfg: _Optional[bool] = ..., guidance_embedding: _Optional[bool] = ..., needs_image: _Optional[bool] = ..., max_sequence_length: _Optional[int] = ..., experts: _Optional[int] = ..., accepts_image: _Optional[bool] = ...) -> None: ...
