// Retries without retry code: a @grpc/grpc-js channel configured only with the service config
// the project ships (proto/imageservice/v1/service_config.json), against a service that sheds.
//
//   node retry_client.js ENDPOINT PROTO_DIR SERVICE_CONFIG REPOSITORY CALLS
//
// Sends CALLS PutImage calls at once (distinct tags), then one INVALID_ARGUMENT and one
// PERMISSION_DENIED call. Prints one JSON line: how many succeeded, the codes of those that
// did not, and the codes of the two refused calls.
'use strict';

const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [endpoint, protoDir, configFile, repository, calls] = process.argv.slice(2);

function manifestOf(n) {
  return JSON.stringify({
    schemaVersion: 2,
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: `sha256:${'3'.repeat(64)}`, size: 2 },
    layers: [],
    annotations: { n: String(n) },
  });
}

function put(client, request) {
  const deadline = new Date(Date.now() + 20_000);
  return new Promise((resolve) => {
    client.PutImage(request, { deadline }, (error) =>
      resolve(error ? grpc.status[error.code] : 'OK'));
  });
}

async function main() {
  const definition = protoLoader.loadSync('imageservice/v1/image_service.proto',
    { includeDirs: [protoDir], keepCase: true });
  const { ImageService } = grpc.loadPackageDefinition(definition).imageservice.v1;
  const client = new ImageService(endpoint, grpc.credentials.createInsecure(), {
    'grpc.service_config': fs.readFileSync(configFile, 'utf8'),
    'grpc.enable_retries': 1,
  });
  const results = await Promise.all([...Array(Number(calls)).keys()].map((n) =>
    put(client, { repository_name: repository, image_tag: `n${n}`, image_manifest: manifestOf(`node-${n}`) })));
  const invalid = await put(client, { repository_name: 'Bad_Name', image_tag: 'x', image_manifest: manifestOf('x') });
  const denied = await put(client, { repository_name: 'denied/app', image_tag: 'x', image_manifest: manifestOf('y') });
  console.log(JSON.stringify({
    client: 'node',
    ok: results.filter((r) => r === 'OK').length,
    failed: results.filter((r) => r !== 'OK'),
    invalid,
    denied,
  }));
  client.close();
}

main().catch((error) => {
  console.error(`node client: ${error}`);
  process.exit(1);
});
