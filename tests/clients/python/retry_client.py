"""Retries without retry code: a grpcio channel configured only with the service config the
project ships (proto/imageservice/v1/service_config.json), against a service that sheds.

    python retry_client.py ENDPOINT PROTO_DIR SERVICE_CONFIG REPOSITORY CALLS

Sends CALLS PutImage calls at once (distinct tags), then one INVALID_ARGUMENT and one
PERMISSION_DENIED call. Prints one JSON line: how many succeeded, the codes of those that did
not, and the codes of the two refused calls.
"""

import concurrent.futures
import json
import sys

import grpc

import tempfile

from seed_client import generate_stubs


def main(endpoint, proto_dir, config_file, repository, calls):
    with open(config_file) as f:
        service_config = f.read()
    with tempfile.TemporaryDirectory() as out:
        pb, pb_grpc = generate_stubs(proto_dir, out)
        options = [("grpc.service_config", service_config), ("grpc.enable_retries", 1)]
        with grpc.insecure_channel(endpoint, options=options) as channel:
            stub = pb_grpc.ImageServiceStub(channel)

            def manifest_of(n):
                return json.dumps({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": "sha256:" + "3" * 64, "size": 2},
                    "layers": [],
                    "annotations": {"n": str(n)},
                }, separators=(",", ":"))

            def put(n):
                request = pb.PutImageRequest(repository_name=repository, image_tag=f"r{n}",
                                             image_manifest=manifest_of(n))
                try:
                    stub.PutImage(request, timeout=20)
                    return "OK"
                except grpc.RpcError as error:
                    return error.code().name

            with concurrent.futures.ThreadPoolExecutor(max_workers=calls) as pool:
                results = list(pool.map(put, range(calls)))

            def refused(request):
                try:
                    stub.PutImage(request, timeout=10)
                    return "OK"
                except grpc.RpcError as error:
                    return error.code().name

            invalid = refused(pb.PutImageRequest(repository_name="Bad_Name", image_tag="x",
                                                 image_manifest="{}"))
            denied = refused(pb.PutImageRequest(repository_name="denied/app", image_tag="x",
                                                image_manifest=manifest_of("denied")))
    print(json.dumps({
        "client": "python",
        "ok": results.count("OK"),
        "failed": [r for r in results if r != "OK"],
        "invalid": invalid,
        "denied": denied,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
