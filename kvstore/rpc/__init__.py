"""Generated stubs for ``proto/kvstream/v1/kvstream.proto`` (``make proto`` regenerates them)."""

from kvstore.rpc import kvstream_pb2 as pb
from kvstore.rpc import kvstream_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
