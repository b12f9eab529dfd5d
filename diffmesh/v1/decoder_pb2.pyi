from diffmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_FORMAT_AUTO: _ClassVar[MediaFormat]
    MEDIA_FORMAT_PNG: _ClassVar[MediaFormat]
    MEDIA_FORMAT_MP4: _ClassVar[MediaFormat]
    MEDIA_FORMAT_NONE: _ClassVar[MediaFormat]
MEDIA_FORMAT_AUTO: MediaFormat
MEDIA_FORMAT_PNG: MediaFormat
MEDIA_FORMAT_MP4: MediaFormat
MEDIA_FORMAT_NONE: MediaFormat

class EncodeImageRequest(_message.Message):
    __slots__ = ("request_id", "model", "image", "width", "height", "num_frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    image: bytes
    width: int
    height: int
    num_frames: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., image: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ...) -> None: ...

class DecodeParams(_message.Message):
    __slots__ = ("request_id", "model", "format", "fps", "return_frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    RETURN_FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    format: MediaFormat
    fps: int
    return_frames: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., format: _Optional[_Union[MediaFormat, str]] = ..., fps: _Optional[int] = ..., return_frames: _Optional[bool] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("params", "tensor")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    params: DecodeParams
    tensor: _tensor_pb2.TensorChunk
    def __init__(self, params: _Optional[_Union[DecodeParams, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("media", "tensor")
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    media: _tensor_pb2.MediaChunk
    tensor: _tensor_pb2.TensorChunk
    def __init__(self, media: _Optional[_Union[_tensor_pb2.MediaChunk, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...
