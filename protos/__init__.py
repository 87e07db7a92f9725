"""Generated gRPC code of the blockserve API (protos/blockserve/v1/); regenerate with `make protos`."""
