// Validates the chart's Istio and Prometheus-operator objects against those projects' CRD
// schemas, as kubernetes-models carries them (@kubernetes-models/istio, .../prometheus-
// operator, pinned in package.json).
//
//   node validate_crds.mjs OBJECT.json ...
//
// Prints one JSON line per object: {kind, apiVersion, name, valid, error?}; exits 1 if any is
// invalid, 2 if a kind has no schema here (the caller decides what that means).
import fs from 'node:fs';
import * as istioSecurity from '@kubernetes-models/istio/security.istio.io/v1';
import * as monitoring from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';

const models = {
  'security.istio.io/v1': istioSecurity,
  'monitoring.coreos.com/v1': monitoring,
};

let invalid = false;
let unknown = false;
for (const file of process.argv.slice(2)) {
  const object = JSON.parse(fs.readFileSync(file, 'utf8'));
  const Model = models[object.apiVersion]?.[object.kind];
  const line = { kind: object.kind, apiVersion: object.apiVersion, name: object.metadata?.name };
  if (!Model) {
    unknown = true;
    console.log(JSON.stringify({ ...line, valid: null }));
    continue;
  }
  try {
    new Model(object).validate();
    console.log(JSON.stringify({ ...line, valid: true }));
  } catch (error) {
    invalid = true;
    console.log(JSON.stringify({ ...line, valid: false, error: error.message }));
  }
}
process.exit(invalid ? 1 : unknown ? 2 : 0);
