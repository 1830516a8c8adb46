"""The node: the gRPC server each edge device runs (server), its client (orchestrator), and the
one module that converts records to protobuf messages (serde). Kept import-light on purpose:
testbed.comm.grpc imports serde and channels from here."""
