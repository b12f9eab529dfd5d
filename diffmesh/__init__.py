"""diffmesh: a serving mesh for diffusion models.

Clients use the generated stubs (`from diffmesh.v1 import gateway_pb2, gateway_pb2_grpc`) or the small
helper in `diffmesh.client`.
"""

__version__ = "0.1.0"
