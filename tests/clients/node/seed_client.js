// The seed scenario from Node.js: @grpc/proto-loader reads proto/ at run time, @grpc/grpc-js
// calls put, get, retag and re-put over a real channel, and a failure's ErrorInfo is decoded
// from its grpc-status-details-bin trailer.
//
//   node seed_client.js ENDPOINT PROTO_DIR MANIFEST_FILE REPOSITORY
//
// Prints one JSON line describing what it saw; exits non-zero (with the reason) on a mismatch.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const [endpoint, protoDir, manifestFile, repository] = process.argv.slice(2);

// google.rpc.Status and ErrorInfo, as published in googleapis (field numbers are the contract).
const rpc = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`, { keepCase: true }).root;

function check(condition, what) {
  if (!condition) {
    console.error(`node client: ${what}`);
    process.exit(1);
  }
}

function errorInfo(error) {
  const [bytes] = error.metadata.get('grpc-status-details-bin');
  check(bytes, `no rich status on ${error.code}`);
  const status = rpc.lookupType('google.rpc.Status').decode(bytes);
  const detail = status.details.find(
    (d) => d.type_url === 'type.googleapis.com/google.rpc.ErrorInfo');
  check(detail, 'no ErrorInfo in the status details');
  return rpc.lookupType('google.rpc.ErrorInfo').decode(detail.value);
}

function call(client, method, request) {
  const deadline = new Date(Date.now() + 30_000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) =>
      error ? reject(error) : resolve(response));
  });
}

async function main() {
  const manifest = fs.readFileSync(manifestFile, 'utf8');
  const digest = 'sha256:' + crypto.createHash('sha256').update(manifest, 'utf8').digest('hex');
  const definition = protoLoader.loadSync('imageservice/v1/image_service.proto',
    { keepCase: true, enums: String, longs: String, defaults: true, includeDirs: [protoDir] });
  const { ImageService } = grpc.loadPackageDefinition(definition).imageservice.v1;
  const client = new ImageService(endpoint, grpc.credentials.createInsecure());

  const put = await call(client, 'PutImage',
    { repository_name: repository, image_tag: '2019.08', image_manifest: manifest });
  check(put.outcome === 'PUT_IMAGE_OUTCOME_CREATED', `put outcome ${put.outcome}`);
  check(put.image.image_id.image_digest === digest, `put digest ${put.image.image_id.image_digest}`);

  const got = await call(client, 'GetImage',
    { repository_name: repository, image_id: { image_tag: '2019.08' } });
  check(got.image.image_manifest === manifest, 'get by tag: bytes differ');

  const retag = await call(client, 'RetagImage', {
    repository_name: repository, source_image_id: { image_tag: '2019.08' }, target_tags: ['latest'],
  });
  check(retag.results.length === 1 && retag.results[0].outcome === 'PUT_IMAGE_OUTCOME_CREATED',
    `retag results ${JSON.stringify(retag.results)}`);
  const latest = await call(client, 'GetImage',
    { repository_name: repository, image_id: { image_digest: digest } });
  check(latest.image.image_manifest === manifest, 'by digest: bytes differ');

  const again = await call(client, 'PutImage',
    { repository_name: repository, image_tag: '2019.08', image_manifest: manifest });
  check(again.outcome === 'PUT_IMAGE_OUTCOME_ALREADY_EXISTED', 're-put not idempotent');

  let info;
  try {
    await call(client, 'GetImage',
      { repository_name: repository, image_id: { image_tag: 'missing' } });
    check(false, 'a missing tag was found');
  } catch (error) {
    check(error.code === grpc.status.NOT_FOUND, `code ${error.code}: ${error.message}`);
    info = errorInfo(error);
  }
  client.close();
  console.log(JSON.stringify({
    client: 'node',
    digest: put.image.image_id.image_digest,
    registryId: put.image.registry_id,
    failure: { code: 'NOT_FOUND', reason: info.reason, domain: info.domain },
  }));
}

main().catch((error) => check(false, error.stack || String(error)));
