"""The seed scenario from Python: stubs generated from proto/ with grpcio-tools at run time,
then put, get, retag and re-put over a real channel, and an ErrorInfo read from a failure.

    python seed_client.py ENDPOINT PROTO_DIR MANIFEST_FILE REPOSITORY

Prints one JSON line describing what it saw; exits non-zero (with the reason) on any mismatch.
"""

import hashlib
import importlib
import importlib.resources
import json
import sys
import tempfile

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_tools import protoc


def generate_stubs(proto_dir, out_dir):
    """Compiles the service's proto into importable modules, as a client project would."""
    include = importlib.resources.files("grpc_tools") / "_proto"
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"{proto_dir}/imageservice/v1/image_service.proto",
    ])
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")
    sys.path.insert(0, out_dir)
    return (
        importlib.import_module("imageservice.v1.image_service_pb2"),
        importlib.import_module("imageservice.v1.image_service_pb2_grpc"),
    )


def check(condition, what):
    if not condition:
        raise SystemExit(f"python client: {what}")


def error_info(error):
    """The google.rpc.ErrorInfo in a failed call's grpc-status-details-bin trailer."""
    status = rpc_status.from_call(error)
    check(status is not None, f"no rich status on {error.code()}")
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise SystemExit("python client: no ErrorInfo in the status details")


def main(endpoint, proto_dir, manifest_file, repository):
    with open(manifest_file, "rb") as f:
        manifest = f.read().decode("utf-8")
    digest = "sha256:" + hashlib.sha256(manifest.encode("utf-8")).hexdigest()
    out_dir = tempfile.mkdtemp(prefix="imageservice-py-")
    pb, pb_grpc = generate_stubs(proto_dir, out_dir)
    Outcome = pb.PutImageOutcome

    with grpc.insecure_channel(endpoint) as channel:
        stub = pb_grpc.ImageServiceStub(channel)
        put = stub.PutImage(pb.PutImageRequest(
            repository_name=repository, image_tag="2019.08", image_manifest=manifest), timeout=30)
        check(put.outcome == Outcome.PUT_IMAGE_OUTCOME_CREATED, f"put outcome {put.outcome}")
        check(put.image.image_id.image_digest == digest, f"put digest {put.image.image_id}")

        got = stub.GetImage(pb.GetImageRequest(
            repository_name=repository, image_id=pb.ImageIdentifier(image_tag="2019.08")), timeout=30)
        check(got.image.image_manifest == manifest, "get by tag: bytes differ")

        retag = stub.RetagImage(pb.RetagImageRequest(
            repository_name=repository, source_image_id=pb.ImageIdentifier(image_tag="2019.08"),
            target_tags=["latest"]), timeout=30)
        check([r.outcome for r in retag.results] == [Outcome.PUT_IMAGE_OUTCOME_CREATED],
              f"retag results {retag.results}")
        latest = stub.GetImage(pb.GetImageRequest(
            repository_name=repository, image_id=pb.ImageIdentifier(image_tag="latest")), timeout=30)
        check(latest.image.image_manifest == manifest, "latest: bytes differ")
        check(latest.image.image_id.image_digest == digest, "latest: digest differs")

        again = stub.PutImage(pb.PutImageRequest(
            repository_name=repository, image_tag="2019.08", image_manifest=manifest), timeout=30)
        check(again.outcome == Outcome.PUT_IMAGE_OUTCOME_ALREADY_EXISTED, "re-put not idempotent")

        try:
            stub.GetImage(pb.GetImageRequest(
                repository_name=repository, image_id=pb.ImageIdentifier(image_tag="missing")),
                timeout=30)
            raise SystemExit("python client: a missing tag was found")
        except grpc.RpcError as error:
            check(error.code() == grpc.StatusCode.NOT_FOUND, f"code {error.code()}")
            info = error_info(error)

    print(json.dumps({
        "client": "python",
        "digest": put.image.image_id.image_digest,
        "registryId": put.image.registry_id,
        "failure": {"code": "NOT_FOUND", "reason": info.reason, "domain": info.domain},
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
