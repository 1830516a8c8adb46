"""The stubs in use are exactly what protoc makes from protos/*.proto now."""

from testbed import protogen


def test_stubs_in_use_match_the_proto_files():
    assert protogen.proto_files(), "no .proto files found"
    assert protogen.differences() == []


def test_stubs_are_imported_from_the_package_they_were_generated_for():
    from testbed.proto import node_pb2, node_pb2_grpc, peer_pb2, peer_pb2_grpc

    assert node_pb2.DESCRIPTOR.name == "testbed/proto/node.proto"
    assert peer_pb2.DESCRIPTOR.name == "testbed/proto/peer.proto"
    assert node_pb2_grpc.NodeStub and peer_pb2_grpc.PeerStub
