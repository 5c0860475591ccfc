"""Stock grpcio health checking and reflection clients against forkd.

    python3 health.py check ADDR            # prints the status of "" and forkd.v1.Forkd
    python3 health.py reflect ADDR [TOKEN]  # prints the services reflection lists
    python3 health.py spawn ADDR SEED       # a Spawn; prints its status code

Run by forkd/tests/clients.rs with PYTHONPATH=python (for the spawn stubs).
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main():
    cmd, addr = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(addr)
    if cmd == "check":
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "forkd.v1.Forkd"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=60)
            print(f"{service or '(server)'} {health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}")
    elif cmd == "reflect":
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
        md = (("authorization", f"Bearer {sys.argv[3]}"),) if len(sys.argv) > 3 else ()
        if md:
            # The reflection client takes no metadata: add it to every call.
            channel = grpc.intercept_channel(channel, _MetadataInterceptor(md))
        try:
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
            print("services", " ".join(sorted(services)))
            desc = ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol("forkd.v1.Forkd")
            print("methods", " ".join(m.name for m in desc.service[0].method))
        except grpc.RpcError as e:
            print("status", e.code().name)
    elif cmd == "spawn":
        from remotefork._pb import forkd_pb2 as pb, forkd_pb2_grpc as pb_grpc
        try:
            list(pb_grpc.ForkdStub(channel).Spawn(pb.SpawnRequest(seed=pb.SeedRef(id=sys.argv[3]))))
            print("status OK")
        except grpc.RpcError as e:
            print("status", e.code().name, e.details())
    channel.close()


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression = getattr(d, "wait_for_ready", None), getattr(d, "compression", None)
        self.metadata = metadata


class _MetadataInterceptor(grpc.StreamStreamClientInterceptor, grpc.UnaryUnaryClientInterceptor):
    def __init__(self, md):
        self.md = list(md)

    def intercept_stream_stream(self, cont, details, it):
        return cont(_ClientCallDetails(details, self.md), it)

    def intercept_unary_unary(self, cont, details, req):
        return cont(_ClientCallDetails(details, self.md), req)


if __name__ == "__main__":
    main()
