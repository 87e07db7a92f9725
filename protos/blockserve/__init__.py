"""The blockserve protobuf package (`blockserve.v1`)."""
