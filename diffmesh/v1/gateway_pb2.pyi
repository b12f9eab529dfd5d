from diffmesh.v1 import tensor_pb2 as _tensor_pb2
from diffmesh.v1 import decoder_pb2 as _decoder_pb2
from diffmesh.v1 import denoiser_pb2 as _denoiser_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATUS_UNSPECIFIED: _ClassVar[JobStatus]
    JOB_STATUS_QUEUED: _ClassVar[JobStatus]
    JOB_STATUS_IN_PROGRESS: _ClassVar[JobStatus]
    JOB_STATUS_COMPLETED: _ClassVar[JobStatus]
    JOB_STATUS_FAILED: _ClassVar[JobStatus]
    JOB_STATUS_CANCELLED: _ClassVar[JobStatus]
JOB_STATUS_UNSPECIFIED: JobStatus
JOB_STATUS_QUEUED: JobStatus
JOB_STATUS_IN_PROGRESS: JobStatus
JOB_STATUS_COMPLETED: JobStatus
JOB_STATUS_FAILED: JobStatus
JOB_STATUS_CANCELLED: JobStatus

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "width", "height", "num_frames", "num_inference_steps", "guidance_scale", "seed", "n", "format", "fps", "return_latents", "return_frames", "request_id", "true_cfg_scale", "guidance_scale_2", "image", "preview_every", "cache")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LATENTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_FRAMES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRUE_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_2_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    n: int
    format: _decoder_pb2.MediaFormat
    fps: int
    return_latents: bool
    return_frames: bool
    request_id: str
    true_cfg_scale: float
    guidance_scale_2: float
    image: bytes
    preview_every: int
    cache: _denoiser_pb2.CacheConfig
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., n: _Optional[int] = ..., format: _Optional[_Union[_decoder_pb2.MediaFormat, str]] = ..., fps: _Optional[int] = ..., return_latents: _Optional[bool] = ..., return_frames: _Optional[bool] = ..., request_id: _Optional[str] = ..., true_cfg_scale: _Optional[float] = ..., guidance_scale_2: _Optional[float] = ..., image: _Optional[bytes] = ..., preview_every: _Optional[int] = ..., cache: _Optional[_Union[_denoiser_pb2.CacheConfig, _Mapping]] = ...) -> None: ...

class JobAccepted(_message.Message):
    __slots__ = ("job_id", "seed")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seed: int
    def __init__(self, job_id: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class JobCompleted(_message.Message):
    __slots__ = ("job_id", "elapsed_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    elapsed_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class PreviewImage(_message.Message):
    __slots__ = ("index", "step", "total_steps", "width", "height", "mime_type", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    step: int
    total_steps: int
    width: int
    height: int
    mime_type: str
    data: bytes
    def __init__(self, index: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., mime_type: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("accepted", "progress", "media", "tensor", "completed", "preview")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    accepted: JobAccepted
    progress: _tensor_pb2.Progress
    media: _tensor_pb2.MediaChunk
    tensor: _tensor_pb2.TensorChunk
    completed: JobCompleted
    preview: PreviewImage
    def __init__(self, accepted: _Optional[_Union[JobAccepted, _Mapping]] = ..., progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., media: _Optional[_Union[_tensor_pb2.MediaChunk, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., completed: _Optional[_Union[JobCompleted, _Mapping]] = ..., preview: _Optional[_Union[PreviewImage, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "model", "status", "progress", "error", "created_at", "completed_at", "width", "height", "num_frames", "queue_position")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    status: JobStatus
    progress: float
    error: str
    created_at: int
    completed_at: int
    width: int
    height: int
    num_frames: int
    queue_position: int
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., status: _Optional[_Union[JobStatus, str]] = ..., progress: _Optional[float] = ..., error: _Optional[str] = ..., created_at: _Optional[int] = ..., completed_at: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., queue_position: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "task", "created", "limits")
    ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    task: str
    created: int
    limits: _tensor_pb2.ModelLimits
    def __init__(self, id: _Optional[str] = ..., task: _Optional[str] = ..., created: _Optional[int] = ..., limits: _Optional[_Union[_tensor_pb2.ModelLimits, _Mapping]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
