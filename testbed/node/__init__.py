"""The node layer: the gRPC server each edge device runs (server), its client (orchestrator), the
records they exchange (records) and their protobuf conversion (serde).

Stands on methods (a node runs one rank of a method: methods.job.RankRunner) and comm (peer
streams); backends start nodes and hand their addresses to an orchestrator.
"""
