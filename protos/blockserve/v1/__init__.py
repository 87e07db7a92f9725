"""blockserve.v1: messages (blockserve_pb2) and the BlockDiffusion service (blockserve_pb2_grpc)."""
