from diffmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("id", "limits")
    ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    limits: _tensor_pb2.ModelLimits
    def __init__(self, id: _Optional[str] = ..., limits: _Optional[_Union[_tensor_pb2.ModelLimits, _Mapping]] = ...) -> None: ...

class DenoiseParams(_message.Message):
    __slots__ = ("request_id", "model", "width", "height", "num_frames", "num_inference_steps", "guidance_scale", "seed", "num_outputs", "true_cfg_scale", "guidance_scale_2", "preview_every", "cache")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TRUE_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_2_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_outputs: int
    true_cfg_scale: float
    guidance_scale_2: float
    preview_every: int
    cache: CacheConfig
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_outputs: _Optional[int] = ..., true_cfg_scale: _Optional[float] = ..., guidance_scale_2: _Optional[float] = ..., preview_every: _Optional[int] = ..., cache: _Optional[_Union[CacheConfig, _Mapping]] = ...) -> None: ...

class CacheConfig(_message.Message):
    __slots__ = ("method", "threshold", "interval", "warmup_steps", "mag_ratios")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAG_RATIOS_FIELD_NUMBER: _ClassVar[int]
    method: str
    threshold: float
    interval: int
    warmup_steps: int
    mag_ratios: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, method: _Optional[str] = ..., threshold: _Optional[float] = ..., interval: _Optional[int] = ..., warmup_steps: _Optional[int] = ..., mag_ratios: _Optional[_Iterable[float]] = ...) -> None: ...

class DenoiseRequest(_message.Message):
    __slots__ = ("params", "tensor")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    params: DenoiseParams
    tensor: _tensor_pb2.TensorChunk
    def __init__(self, params: _Optional[_Union[DenoiseParams, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class LatentPreview(_message.Message):
    __slots__ = ("step", "total_steps", "image")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    image: _tensor_pb2.Tensor
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., image: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DenoiseEvent(_message.Message):
    __slots__ = ("progress", "tensor", "preview")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    tensor: _tensor_pb2.TensorChunk
    preview: LatentPreview
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., preview: _Optional[_Union[LatentPreview, _Mapping]] = ...) -> None: ...
