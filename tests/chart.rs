//! The Helm chart, linted and rendered by Helm itself (the official v4.1.4 binary, installed
//! pinned by `scripts/test-deps.sh`), with its defaults and with a values file that turns
//! everything on; the assertions read the rendered objects, parsed as YAML, never grepped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_ecr-image-service");
const RELEASE: &str = "images";
const NAMESPACE: &str = "platform";
/// The name every object gets: release + chart name.
const FULLNAME: &str = "images-ecr-image-service";
const EVERYTHING_ON: &str = "tests/fixtures/chart/everything-on.yaml";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/ecr-image-service";
/// Start-up of the binary on a loaded CI machine; polled, never slept for.
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Helm and the Python (with PyYAML) that turns its YAML into JSON, installed once per run.
fn tools() -> &'static (PathBuf, PathBuf) {
    static TOOLS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let status = Command::new(root().join("scripts/test-deps.sh"))
            .args(["helm", "moto"])
            .status()
            .expect("run scripts/test-deps.sh");
        assert!(status.success(), "scripts/test-deps.sh helm moto: {status}");
        let venv = std::env::var_os("ECR_TEST_VENV")
            .map_or_else(|| root().join("target/test-venv"), PathBuf::from);
        (
            root().join("target/test-tools/helm-v4.1.4/helm"),
            venv.join("bin/python"),
        )
    })
}

fn helm(args: &[&str]) -> Output {
    Command::new(&tools().0)
        .current_dir(root())
        .args(args)
        .output()
        .expect("run helm")
}

/// `--set` of the IAM role: the ECR backend refuses to render without one (or another
/// credential source), so every render starts from it; a test clears it to see that refusal.
const WITH_ROLE: &str = "serviceAccount.roleArn=arn:aws:iam::123456789012:role/ecr-image-service";

/// `helm template` with a role and `args` added; its stderr on failure.
fn try_render(args: &[&str]) -> Result<Vec<Value>, String> {
    render_text(args).map(|text| yaml_documents(&text))
}

/// `helm template` with a role and `args` added, as Helm printed it; its stderr on failure.
fn render_text(args: &[&str]) -> Result<Vec<u8>, String> {
    let mut argv = vec!["template", RELEASE, "helm/ecr-image-service"];
    argv.extend_from_slice(&["--namespace", NAMESPACE, "--set", WITH_ROLE]);
    argv.extend_from_slice(args);
    let output = helm(&argv);
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(output.stdout)
}

fn render(args: &[&str]) -> Vec<Value> {
    try_render(args).unwrap_or_else(|stderr| panic!("helm template {args:?}: {stderr}"))
}

/// Every non-empty document of a YAML stream, as JSON values (PyYAML's safe loader).
fn yaml_documents(yaml: &[u8]) -> Vec<Value> {
    let mut python = Command::new(&tools().1)
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python");
    python
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml)
        .expect("write YAML");
    let output = python.wait_with_output().expect("python");
    assert!(output.status.success(), "the rendered YAML does not parse");
    serde_json::from_slice(&output.stdout).expect("JSON from python")
}

/// The objects of `kind` in a rendering.
fn all<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// The one object of `kind`.
fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    match all(objects, kind).as_slice() {
        [object] => object,
        other => panic!("expected one {kind}, found {}", other.len()),
    }
}

/// The file `file` of the ConfigMap named `<fullname>-<suffix>`.
fn config_file(objects: &[Value], suffix: &str, file: &str) -> String {
    let name = format!("{FULLNAME}-{suffix}");
    all(objects, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == name.as_str())
        .unwrap_or_else(|| panic!("no ConfigMap {name}"))["data"][file]
        .as_str()
        .unwrap_or_else(|| panic!("no {file} in {name}"))
        .to_owned()
}

fn service_container(objects: &[Value]) -> &Value {
    &one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let value = e["value"].as_str().expect("env values are strings");
            (
                e["name"].as_str().expect("name").to_owned(),
                value.to_owned(),
            )
        })
        .collect()
}

/// Whole seconds of a `"25s"`-style duration, as the chart writes the drain settings.
fn seconds(duration: &str) -> u64 {
    duration
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not whole seconds: {duration:?}"))
}

#[test]
fn helm_lint_passes_with_defaults_and_with_everything_on() {
    for args in [vec!["--set", WITH_ROLE], vec!["--values", EVERYTHING_ON]] {
        let mut argv = vec!["lint", "--strict", "helm/ecr-image-service"];
        argv.extend_from_slice(&args);
        let output = helm(&argv);
        assert!(
            output.status.success(),
            "helm lint {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn defaults_render_hardened_pods_with_native_grpc_probes() {
    let objects = render(&[]);
    let pod = &one(&objects, "Deployment")["spec"]["template"]["spec"];
    let container = service_container(&objects);

    // Native gRPC probes on the gRPC port; readiness asks for the service that drains.
    let grpc_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("a port named grpc")["containerPort"]
        .clone();
    assert_eq!(grpc_port, 50051);
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let probe_spec = &container[probe];
        assert_eq!(probe_spec["grpc"]["port"], grpc_port, "{probe}");
        assert!(
            probe_spec.get("httpGet").is_none() && probe_spec.get("exec").is_none(),
            "{probe} is gRPC only"
        );
    }
    assert_eq!(
        container["readinessProbe"]["grpc"]["service"],
        "imageservice.v1.ImageService"
    );

    // Hardened: non-root, read-only root, no capabilities, RuntimeDefault seccomp.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert_eq!(pod["automountServiceAccountToken"], false);

    // Kubernetes waits longer than the whole drain.
    let settings = env(container);
    let drain = seconds(&settings["ECR_IMAGE_SERVICE_SHUTDOWN_DELAY"])
        + seconds(&settings["ECR_IMAGE_SERVICE_SHUTDOWN_GRACE"]);
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(termination > drain, "{termination} s <= drain {drain} s");
    assert_eq!(settings["ECR_IMAGE_SERVICE_REFLECTION"], "true");
    assert_eq!(
        settings["ECR_IMAGE_SERVICE_RATE_SHARE"], "2",
        "two replicas share ECR's quota"
    );

    // The Service names its gRPC port for the mesh.
    let service = one(&objects, "Service");
    let ports = service["spec"]["ports"].as_array().unwrap();
    let grpc = ports.iter().find(|p| p["name"] == "grpc").unwrap();
    assert_eq!(grpc["appProtocol"], "grpc");
    assert_eq!(grpc["port"], 50051);
    assert_eq!(grpc["targetPort"], "grpc");
    assert_eq!(
        ports.len(),
        1,
        "the admin port stays off the Service: {ports:?}"
    );

    // IRSA: the role every render here sets, as the ServiceAccount's annotation.
    let account = one(&objects, "ServiceAccount");
    assert_eq!(
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        ROLE_ARN
    );
    assert_eq!(
        pod["serviceAccountName"], account["metadata"]["name"],
        "the pods run as the chart's ServiceAccount"
    );

    // Two replicas by default: a PDB; the optional objects stay off.
    assert_eq!(
        one(&objects, "PodDisruptionBudget")["spec"]["maxUnavailable"],
        1
    );
    for kind in ["HorizontalPodAutoscaler", "PodMonitor", "NetworkPolicy"] {
        assert!(all(&objects, kind).is_empty(), "{kind} is off by default");
    }

    // `helm test`: the image's own health-check against the Service.
    let test = one(&objects, "Pod");
    assert_eq!(test["metadata"]["annotations"]["helm.sh/hook"], "test");
    let args = &test["spec"]["containers"][0]["args"];
    assert_eq!(args[0], "health-check");
    assert_eq!(
        args[2],
        format!("http://{FULLNAME}.{NAMESPACE}.svc:50051").as_str()
    );
}

#[test]
fn everything_on_renders_irsa_autoscaling_monitoring_policy_and_mesh() {
    let objects = render(&["--values", EVERYTHING_ON]);
    let annotations = &one(&objects, "ServiceAccount")["metadata"]["annotations"];
    assert_eq!(annotations["eks.amazonaws.com/role-arn"], ROLE_ARN);
    assert_eq!(
        annotations["eks.amazonaws.com/sts-regional-endpoints"],
        "true"
    );

    let deployment = one(&objects, "Deployment");
    assert!(
        deployment["spec"].get("replicas").is_none(),
        "the HPA owns the replica count"
    );
    let hpa = one(&objects, "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    assert_eq!(hpa["spec"]["maxReplicas"], 12);
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], FULLNAME);
    assert_eq!(
        one(&objects, "PodDisruptionBudget")["spec"]["maxUnavailable"],
        1
    );
    let monitor = one(&objects, "PodMonitor");
    assert_eq!(
        monitor["spec"]["podMetricsEndpoints"][0]["port"],
        "http-metrics"
    );
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let policy = one(&objects, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["ecr-image-service/client"],
        "true"
    );

    // Mesh knobs: injection, hold the app until the proxy is up, drain the proxy with it.
    let template = &deployment["spec"]["template"];
    let pod_annotations = &template["metadata"]["annotations"];
    assert_eq!(
        template["metadata"]["labels"]["sidecar.istio.io/inject"],
        "true"
    );
    let istio: Value =
        serde_json::from_str(pod_annotations["proxy.istio.io/config"].as_str().unwrap()).unwrap();
    assert_eq!(istio["holdApplicationUntilProxyStarts"], true);
    assert_eq!(istio["terminationDrainDuration"], "33s");
    assert_eq!(pod_annotations["linkerd.io/inject"], "enabled");
    assert_eq!(pod_annotations["config.linkerd.io/proxy-await"], "enabled");
    assert_eq!(pod_annotations["example.com/team"], "platform");

    let pod = &template["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 45);
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    let container = &pod["containers"][0];
    assert!(
        container["image"]
            .as_str()
            .unwrap()
            .ends_with("/ecr-image-service@sha256:8ece96b74f87652876199d83bd107d0435a196133af383ac54cb82b6cc5283ae"),
        "a digest pins the image"
    );
    let settings = env(container);
    assert_eq!(settings["ECR_IMAGE_SERVICE_RATE_SHARE"], "5");
    assert_eq!(settings["ECR_IMAGE_SERVICE_REFLECTION"], "false");
    assert_eq!(settings["AWS_STS_REGIONAL_ENDPOINTS"], "regional");
}

/// The env twins `serve --help` lists: the binary's own list of its settings.
fn env_twins() -> Vec<String> {
    let help = Command::new(BINARY)
        .args(["serve", "--help"])
        .output()
        .expect("serve --help");
    let help = String::from_utf8(help.stdout).expect("UTF-8 help");
    let twins: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect();
    assert!(twins.len() > 20, "too few env twins in the help: {twins:?}");
    twins
}

/// Every setting of the binary is reachable from values, and the binary accepts what the chart
/// renders: started with exactly the rendered environment, it comes up with those settings.
#[test]
fn every_setting_of_the_binary_is_reachable_from_values_and_accepted_by_it() {
    let objects = render(&["--values", EVERYTHING_ON]);
    let mut settings = env(service_container(&objects));
    // The embedded store's directory is set only with that backend.
    let local = render(&["--values", EVERYTHING_ON, "--set", "config.backend=local"]);
    let local_settings = env(service_container(&local));
    // A private CA for a rediss:// Redis, mounted from a Secret, and the URL it needs.
    let redis_tls = render(&[
        "--values",
        EVERYTHING_ON,
        "--set",
        "redis.url=rediss://redis:6379,redis.tls.enabled=true,redis.tls.caSecret=redis-ca",
    ]);
    let redis_tls_settings = env(service_container(&redis_tls));
    assert_eq!(
        redis_tls_settings["ECR_IMAGE_SERVICE_REDIS_CA_FILE"],
        "/etc/ecr-image-service/redis-ca/ca.crt"
    );
    let mounted = service_container(&redis_tls)["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["mountPath"] == "/etc/ecr-image-service/redis-ca");
    assert!(mounted, "the Redis CA Secret is mounted");
    assert!(
        try_render(&[
            "--values",
            EVERYTHING_ON,
            "--set",
            "redis.url=redis://redis:6379,redis.tls.enabled=true"
        ])
        .unwrap_err()
        .contains("redis.tls.enabled needs a rediss:// redis.url")
    );
    // The service's own mTLS is for deployments without a mesh: the kubelet's gRPC probes
    // cannot present a client certificate, so the chart (probes on, sidecars for identity)
    // does not offer it.
    let not_in_chart = [
        "ECR_IMAGE_SERVICE_TLS_CERT",
        "ECR_IMAGE_SERVICE_TLS_KEY",
        "ECR_IMAGE_SERVICE_TLS_CLIENT_CA",
    ];
    for twin in env_twins() {
        assert!(
            settings.contains_key(&twin)
                || local_settings.contains_key(&twin)
                || redis_tls_settings.contains_key(&twin)
                || not_in_chart.contains(&twin.as_str()),
            "{twin} cannot be set from values"
        );
    }

    // Loopback and any free port for this run; the policy the ConfigMap holds, written where
    // this run can read it; everything else exactly as rendered.
    let home = std::env::temp_dir().join(format!("chart-home-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let rendered_policy = config_file(&objects, "authz", "policy.yaml");
    let policy_file = home.join("policy.yaml");
    std::fs::write(&policy_file, rendered_policy).unwrap();
    let registries_file = home.join("registries.yaml");
    std::fs::write(
        &registries_file,
        config_file(&objects, "registries", "registries.yaml"),
    )
    .unwrap();
    assert!(settings["ECR_IMAGE_SERVICE_REGISTRIES"].ends_with("/registries.yaml"));
    settings.insert(
        "ECR_IMAGE_SERVICE_REGISTRIES".into(),
        registries_file.to_str().unwrap().into(),
    );
    assert!(settings["ECR_IMAGE_SERVICE_AUTHZ_POLICY"].ends_with("/policy.yaml"));
    settings.insert(
        "ECR_IMAGE_SERVICE_AUTHZ_POLICY".into(),
        policy_file.to_str().unwrap().into(),
    );
    let key_file = home.join("page-token-key");
    std::fs::write(&key_file, [7u8; 32]).unwrap();
    assert!(settings.contains_key("ECR_IMAGE_SERVICE_PAGE_TOKEN_KEY_FILE"));
    settings.insert(
        "ECR_IMAGE_SERVICE_PAGE_TOKEN_KEY_FILE".into(),
        key_file.to_str().unwrap().into(),
    );
    settings.insert("ECR_IMAGE_SERVICE_LISTEN".into(), "127.0.0.1:0".into());
    settings.insert(
        "ECR_IMAGE_SERVICE_ADMIN_LISTEN".into(),
        "127.0.0.1:0".into(),
    );
    let mut child = Command::new(BINARY)
        .arg("serve")
        .env_clear()
        .envs(&settings)
        .env("HOME", &home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + STARTUP_DEADLINE;
    let mut seen = Vec::new();
    let mut ready = Value::Null;
    let listening = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            let _ = child.kill();
            panic!("not listening with the rendered settings: {seen:#?}");
        };
        if let Ok(json) = serde_json::from_str::<Value>(&line) {
            if json["message"] == "listening" {
                break json;
            }
            if json["message"] == "backend ready" {
                ready = json;
                continue;
            }
        }
        seen.push(line);
    };
    let _ = child.kill();
    let _ = child.wait();
    // Values that reached the binary, in its own words: the backend's on its ready line, the
    // server's and the cache's on the listening line.
    assert_eq!(ready["region"], "eu-west-1");
    assert_eq!(ready["ecr_endpoint"], "http://127.0.0.1:9");
    assert_eq!(ready["max_attempts"], 4);
    assert_eq!(listening["digest_cache_bytes"], 128 << 20);
    assert_eq!(listening["tag_ttl"], "30s");
    assert_eq!(listening["identity_source"], "istio-xfcc");
    assert_eq!(listening["attribute_writes"], "none");
    assert_eq!(listening["audit"], true);
}

/// `registries` become a ConfigMap mounted (as a directory, so updates reach the pod) where
/// `ECR_IMAGE_SERVICE_REGISTRIES` points, in the file shape the service reads; without the
/// value there is neither.
#[test]
fn registries_become_the_registries_file() {
    let objects = render(&["--values", EVERYTHING_ON]);
    let container = service_container(&objects);
    let settings = env(container);
    let path = &settings["ECR_IMAGE_SERVICE_REGISTRIES"];
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "registries")
        .expect("the registries volume is mounted");
    assert!(path.starts_with(mount["mountPath"].as_str().unwrap()));
    assert!(mount.get("subPath").is_none());
    let file = config_file(&objects, "registries", "registries.yaml");
    let registries =
        ecr_image_service::registry::accounts::Registries::parse(&file).expect("a valid file");
    let account = registries.account("111122223333").expect("the account");
    let role = account.role.as_ref().expect("its role");
    assert_eq!(role.arn, "arn:aws:iam::111122223333:role/ecr-image-service");
    assert_eq!(role.external_id.as_deref(), Some("images"));
    assert_eq!(role.session_duration, Duration::from_secs(30 * 60));
    assert_eq!(account.regions.len(), 2);

    let plain = render(&[]);
    assert!(!env(service_container(&plain)).contains_key("ECR_IMAGE_SERVICE_REGISTRIES"));
    let refused = try_render(&["--set", "registries[0].account=42"]).unwrap_err();
    assert!(refused.contains("registries"), "{refused}");
}

#[test]
fn pdb_and_spread_only_with_more_than_one_replica() {
    let cases: [(&[&str], bool); 4] = [
        (&[], true),
        (&["--set", "replicaCount=1"], false),
        (
            &[
                "--set",
                "autoscaling.enabled=true,autoscaling.minReplicas=1",
            ],
            false,
        ),
        (
            &[
                "--set",
                "replicaCount=1,autoscaling.enabled=true,autoscaling.minReplicas=2",
            ],
            true,
        ),
    ];
    for (args, several) in cases {
        let objects = render(args);
        assert_eq!(
            all(&objects, "PodDisruptionBudget").len(),
            usize::from(several),
            "PDB with {args:?}"
        );
        let pod = &one(&objects, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(
            pod.get("topologySpreadConstraints").is_some(),
            several,
            "spread with {args:?}"
        );
    }
}

#[test]
fn ipv6_listen_address_is_bracketed() {
    let objects = render(&["--set", "listenAddress=::"]);
    let settings = env(service_container(&objects));
    assert_eq!(settings["ECR_IMAGE_SERVICE_LISTEN"], "[::]:50051");
    assert_eq!(settings["ECR_IMAGE_SERVICE_ADMIN_LISTEN"], "[::]:9090");
}

/// Wrong values fail the render (schema or template), naming what is wrong.
#[test]
fn bad_values_are_refused_naming_the_value() {
    let cases = [
        ("replicaCount=two", "/replicaCount"),
        ("config.tagTtl=10", "/config/tagTtl"),
        ("config.logFormat=xml", "/config/logFormat"),
        ("serviceAccount.roleArn=admin", "/serviceAccount/roleArn"),
        ("replicas=3", "replicas"),
        ("registries[0].account=42", "/registries/0/account"),
        (
            "terminationGracePeriodSeconds=20",
            "terminationGracePeriodSeconds (20)",
        ),
    ];
    for (set, named) in cases {
        match try_render(&["--set", set]) {
            Ok(_) => panic!("--set {set} rendered"),
            Err(stderr) => assert!(stderr.contains(named), "--set {set}: {stderr}"),
        }
    }
}

/// `config.backend: local` mounts a volume for the store (the root filesystem is read-only):
/// an emptyDir, or the PersistentVolumeClaim named in values.
#[test]
fn the_local_backend_gets_a_writable_data_volume() {
    for (claim, expect_claim) in [(None, false), (Some("images-data"), true)] {
        let mut args = vec!["--set", "config.backend=local"];
        let set_claim;
        if let Some(claim) = claim {
            set_claim = format!("localStore.existingClaim={claim}");
            args.extend(["--set", &set_claim]);
        }
        let objects = render(&args);
        let container = service_container(&objects);
        let settings = env(container);
        assert_eq!(settings["ECR_IMAGE_SERVICE_BACKEND"], "local");
        assert_eq!(settings["ECR_IMAGE_SERVICE_DATA_DIR"], "/data");
        assert_eq!(container["volumeMounts"][0]["mountPath"], "/data");
        let volume = &one(&objects, "Deployment")["spec"]["template"]["spec"]["volumes"][0];
        assert_eq!(volume["name"], container["volumeMounts"][0]["name"]);
        if expect_claim {
            assert_eq!(volume["persistentVolumeClaim"]["claimName"], "images-data");
        } else {
            assert!(volume["emptyDir"].is_object(), "{volume}");
        }
    }
    let objects = render(&[]);
    assert!(service_container(&objects).get("volumeMounts").is_none());
}

/// The image's entrypoint is the bare binary (no Docker engine here to build it, so its
/// Dockerfile is read instead), and the chart's args start with real subcommands: `serve` for
/// the service, `health-check` for the `helm test` pod.
#[test]
fn the_chart_args_select_subcommands_of_the_image_entrypoint() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let entrypoint = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("ENTRYPOINT "))
        .expect("an ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).expect("exec form");
    assert_eq!(entrypoint, ["/usr/local/bin/ecr-image-service"]);

    let objects = render(&[]);
    let service_args = &service_container(&objects)["args"];
    let test_args = &one(&objects, "Pod")["spec"]["containers"][0]["args"];
    for args in [service_args, test_args] {
        let args: Vec<&str> = args
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let status = Command::new(BINARY)
            .args(&args)
            .arg("--help")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "`{}` is not a command of the binary",
            args.join(" ")
        );
    }
}

/// With the ECR backend and IRSA, no role fails the render (the pod would otherwise fall back to
/// the node's instance role through IMDS); the instance metadata service is off unless asked
/// for by `aws.credentialSource: instanceMetadata`.
#[test]
fn the_ecr_backend_needs_credentials_and_imds_is_off_unless_wanted() {
    let no_role = "serviceAccount.roleArn=";
    let refused = try_render(&["--set", no_role]).expect_err("ECR without a role renders");
    assert!(
        refused.contains("serviceAccount.roleArn is required"),
        "{refused}"
    );

    let imds = |args: &[&str]| {
        env(service_container(&render(args)))
            .get("AWS_EC2_METADATA_DISABLED")
            .cloned()
    };
    assert_eq!(imds(&[]).as_deref(), Some("true"), "IRSA");
    for source in ["podIdentity", "env"] {
        let set = format!("aws.credentialSource={source}");
        assert_eq!(
            imds(&["--set", no_role, "--set", &set]).as_deref(),
            Some("true"),
            "{source}"
        );
    }
    assert_eq!(
        imds(&["--set", no_role, "--set", "config.backend=local"]).as_deref(),
        Some("true"),
        "the embedded store needs no role"
    );
    let on_purpose = [
        "--set",
        no_role,
        "--set",
        "aws.credentialSource=instanceMetadata",
    ];
    assert_eq!(imds(&on_purpose), None, "the node's role, on purpose");
}

/// The request-bytes admission is sized from the pod's memory limit, as the values document:
/// (limit - digest cache - 96 MiB) / 3. The chart's default limit gives the binary's default; a
/// limit that cannot hold one largest request fails the render.
#[test]
fn request_bytes_in_flight_follow_the_memory_limit() {
    let budget = |args: &[&str]| {
        env(service_container(&render(args)))["ECR_IMAGE_SERVICE_MAX_REQUEST_BYTES_IN_FLIGHT"]
            .parse::<usize>()
            .unwrap()
    };
    assert_eq!(
        budget(&[]),
        ecr_image_service::server::DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT
    );
    assert_eq!(
        budget(&["--set", "resources.limits.memory=1Gi"]),
        ((1024 - 64 - 96) / 3) << 20
    );
    assert_eq!(
        budget(&[
            "--set",
            "resources.limits.memory=1Gi",
            "--set",
            "config.digestCacheBytes=256MiB"
        ]),
        ((1024 - 256 - 96) / 3) << 20
    );
    let refused = try_render(&["--set", "resources.limits.memory=128Mi"])
        .expect_err("a limit below one request renders");
    assert!(
        refused.contains("resources.limits.memory (128Mi)"),
        "{refused}"
    );
}

/// Every base image of the Dockerfile is pinned by digest, so a rebuild gets reviewed bytes.
#[test]
fn the_dockerfile_pins_its_base_images_by_digest() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let bases: Vec<&str> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("FROM "))
        .collect();
    assert_eq!(bases.len(), 2, "{bases:?}");
    for base in bases {
        let image = base.split_whitespace().next().unwrap();
        let (_, digest) = image.split_once("@sha256:").unwrap_or_else(|| {
            panic!("{image} is not pinned by digest");
        });
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "{image}"
        );
    }
}

/// `authz.rules` become a ConfigMap mounted as the policy file, and the identity source follows
/// the mesh. A mesh without rules refuses to render unless `authz.allowAll` says so; the
/// mesh's own layer (mTLS STRICT, meshed principals only) renders on request.
#[test]
fn authz_rules_become_the_policy_and_a_mesh_needs_them() {
    let objects = render(&["--values", EVERYTHING_ON]);
    let container = service_container(&objects);
    let settings = env(container);
    assert_eq!(settings["ECR_IMAGE_SERVICE_IDENTITY_SOURCE"], "istio-xfcc");
    let policy_path = &settings["ECR_IMAGE_SERVICE_AUTHZ_POLICY"];
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "authz")
        .expect("the policy volume is mounted");
    assert!(policy_path.starts_with(mount["mountPath"].as_str().unwrap()));
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never sees updates"
    );
    let policy = config_file(&objects, "authz", "policy.yaml");
    assert!(
        policy.contains("ci-team-a") && policy.contains("team-a/**"),
        "{policy}"
    );
    let peer = one(&objects, "PeerAuthentication");
    assert_eq!(peer["spec"]["mtls"]["mode"], "STRICT");
    let istio_policy = all(&objects, "AuthorizationPolicy")
        .into_iter()
        .find(|p| {
            p["apiVersion"]
                .as_str()
                .unwrap()
                .starts_with("security.istio.io")
        })
        .expect("Istio's AuthorizationPolicy");
    assert_eq!(
        istio_policy["spec"]["rules"][0]["from"][0]["source"]["principals"],
        serde_json::json!(["*"])
    );
    assert_eq!(one(&objects, "Server")["spec"]["proxyProtocol"], "gRPC");
    assert_eq!(
        one(&objects, "MeshTLSAuthentication")["spec"]["identities"],
        serde_json::json!(["*"])
    );

    let refused = try_render(&["--set", "mesh.linkerd.enabled=true"])
        .expect_err("a mesh without rules renders");
    assert!(refused.contains("authz.rules is empty"), "{refused}");
    let allowed = render(&[
        "--set",
        "mesh.linkerd.enabled=true",
        "--set",
        "authz.allowAll=true",
    ]);
    let settings = env(service_container(&allowed));
    assert_eq!(settings["ECR_IMAGE_SERVICE_IDENTITY_SOURCE"], "linkerd");
    assert!(!settings.contains_key("ECR_IMAGE_SERVICE_AUTHZ_POLICY"));
    assert!(all(&allowed, "ConfigMap").is_empty());

    let plain = render(&[]);
    assert_eq!(
        env(service_container(&plain))["ECR_IMAGE_SERVICE_IDENTITY_SOURCE"],
        "none"
    );
}

/// The kinds no Kubernetes release defines: the mesh's and the Prometheus operator's CRDs.
/// kubernetes-validate has no schema for them. Istio's and the Prometheus operator's are
/// validated against their CRDs' schemas through kubernetes-models (npm, pinned); Linkerd's
/// (`Server`, `MeshTLSAuthentication`, its `AuthorizationPolicy`) have no published schema
/// package in a reachable registry, and only the assertions above check them.
const CRD_KINDS: [&str; 6] = [
    "AuthorizationPolicy",
    "MeshTLSAuthentication",
    "PeerAuthentication",
    "PodMonitor",
    "PrometheusRule",
    "Server",
];

/// Every rendered manifest, for a matrix of value sets, is valid against the OpenAPI schemas
/// of Kubernetes 1.37 (kubernetes-validate, strict: no unknown fields), but for the CRDs'
/// objects, which must be only those kinds.
#[test]
fn every_rendered_manifest_is_valid_kubernetes() {
    let status = Command::new(root().join("scripts/test-deps.sh"))
        .arg("kubevalidate")
        .status()
        .expect("run scripts/test-deps.sh");
    assert!(
        status.success(),
        "scripts/test-deps.sh kubevalidate: {status}"
    );
    let validate = root().join("target/test-kubevalidate/bin/kubernetes-validate");
    let matrix: [(&str, Vec<&str>); 8] = [
        ("defaults", vec![]),
        (
            "ecr with irsa",
            vec![
                "--set",
                "config.region=eu-west-1",
                "--set-string",
                "serviceAccount.annotations.eks\\.amazonaws\\.com/sts-regional-endpoints=true",
            ],
        ),
        (
            "istio",
            vec![
                "--set",
                "mesh.istio.enabled=true,authz.allowAll=true,authz.meshPolicy=true",
            ],
        ),
        (
            "linkerd",
            vec![
                "--set",
                "mesh.linkerd.enabled=true,authz.allowAll=true,authz.meshPolicy=true",
            ],
        ),
        (
            "redis with tls",
            vec![
                "--set",
                "redis.url=rediss://redis:6379,redis.tls.enabled=true,redis.tls.caSecret=redis-ca",
            ],
        ),
        (
            "authz and registries",
            vec![
                "--set-json",
                r#"authz.rules=[{"id":"a","principals":["*"],"actions":["read"],"repositories":["**"]}]"#,
                "--set-json",
                r#"registries=[{"account":"111122223333","roleArn":"arn:aws:iam::111122223333:role/x"}]"#,
            ],
        ),
        ("local backend", vec!["--set", "config.backend=local"]),
        ("everything on", vec!["--values", EVERYTHING_ON]),
    ];
    let dir = std::env::temp_dir().join(format!("chart-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, args) in matrix {
        let text = render_text(&args).unwrap_or_else(|e| panic!("{name}: {e}"));
        let file = dir.join(format!("{}.yaml", name.replace(' ', "-")));
        std::fs::write(&file, &text).unwrap();
        let output = Command::new(&validate)
            .args(["--strict", "-k", "1.37.0"])
            .arg(&file)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{name}: {said}");
        let passed = said
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        let skipped: Vec<&str> = said
            .lines()
            .filter(|l| l.contains("Couldn't find schema for kind"))
            .filter_map(|l| l.split("kind ").nth(1)?.split(' ').next())
            .collect();
        assert!(
            skipped.iter().all(|kind| CRD_KINDS.contains(kind)),
            "{name}: no schema for {skipped:?}"
        );
        let objects = yaml_documents(&text);
        assert_eq!(passed + skipped.len(), objects.len(), "{name}: {said}");
        let crds = validate_crds(&dir, name, &objects);
        eprintln!("{name}: {passed} objects valid against Kubernetes 1.37; CRD objects: {crds:?}");
    }
}

/// `promtool`, installed by `scripts/test-deps.sh prometheus`.
fn promtool(args: &[&str]) -> Output {
    let status = Command::new(root().join("scripts/test-deps.sh"))
        .arg("prometheus")
        .status()
        .expect("run scripts/test-deps.sh");
    assert!(
        status.success(),
        "scripts/test-deps.sh prometheus: {status}"
    );
    Command::new("promtool")
        .current_dir(root())
        .args(args)
        .output()
        .expect("run promtool")
}

/// The PrometheusRule the chart renders is the rule file, and Prometheus's own `promtool`
/// accepts it (`check rules`) and fires each alert on its synthetic series and only there
/// (`test rules`, tests/fixtures/alerts/alerts_test.yaml). Off by default.
#[test]
fn the_alerting_rules_are_checked_by_promtool() {
    assert!(all(&render(&[]), "PrometheusRule").is_empty());
    let objects = render(&[
        "--set",
        "prometheusRule.enabled=true,prometheusRule.labels.release=monitoring",
    ]);
    let rule = one(&objects, "PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "monitoring");
    let dir = std::env::temp_dir().join(format!("chart-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rendered = dir.join("rendered-rules.json");
    std::fs::write(&rendered, rule["spec"].to_string()).unwrap();
    for args in [
        vec!["check", "rules", rendered.to_str().unwrap()],
        vec!["check", "rules", "helm/ecr-image-service/files/alerts.yaml"],
        vec!["test", "rules", "tests/fixtures/alerts/alerts_test.yaml"],
    ] {
        let output = promtool(&args);
        let said = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        eprintln!("promtool {}: {}", args.join(" "), said.trim());
        assert!(output.status.success(), "promtool {args:?}: {said}");
    }
    let alerts: Vec<&str> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    let runbooks = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    for alert in &alerts {
        assert!(
            runbooks.contains(&format!("### {alert}")),
            "docs/operations.md has no runbook section for {alert}"
        );
    }
    assert_eq!(alerts.len(), 7, "{alerts:?}");
}

/// The dashboard is rendered, byte for byte, into a ConfigMap with Grafana's sidecar label;
/// off by default.
#[test]
fn the_dashboard_is_a_configmap_grafana_discovers() {
    assert!(
        all(&render(&[]), "ConfigMap")
            .iter()
            .all(|c| c["metadata"]["name"] != format!("{FULLNAME}-dashboard").as_str())
    );
    let objects = render(&["--set", "dashboards.enabled=true"]);
    let map = all(&objects, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == format!("{FULLNAME}-dashboard").as_str())
        .expect("the dashboard ConfigMap");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped =
        std::fs::read_to_string(root().join("helm/ecr-image-service/files/dashboard.json"))
            .unwrap();
    let rendered = map["data"]["ecr-image-service.json"].as_str().unwrap();
    let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap();
    assert_eq!(parse(rendered), parse(&shipped));
}

/// Validates the Istio and Prometheus-operator objects of `objects` against their CRDs'
/// schemas (tests/clients/node/validate_crds.mjs); what each CRD object got: `valid` or
/// `no schema` (Linkerd's).
fn validate_crds(dir: &std::path::Path, name: &str, objects: &[Value]) -> Vec<String> {
    let crds: Vec<&Value> = objects
        .iter()
        .filter(|o| CRD_KINDS.contains(&o["kind"].as_str().unwrap_or("")))
        .collect();
    if crds.is_empty() {
        return Vec::new();
    }
    let status = Command::new(root().join("scripts/test-deps.sh"))
        .arg("node")
        .status()
        .expect("run scripts/test-deps.sh");
    assert!(status.success(), "scripts/test-deps.sh node: {status}");
    let files: Vec<PathBuf> = crds
        .iter()
        .enumerate()
        .map(|(i, object)| {
            let file = dir.join(format!("{}-crd-{i}.json", name.replace(' ', "-")));
            std::fs::write(&file, object.to_string()).unwrap();
            file
        })
        .collect();
    // Beside the installed packages: ES modules resolve from the importing file's directory
    // (NODE_PATH is for require() only).
    let script = root().join("target/test-node/validate_crds.mjs");
    std::fs::copy(root().join("tests/clients/node/validate_crds.mjs"), &script).unwrap();
    let output = Command::new("node")
        .arg(&script)
        .args(&files)
        .output()
        .expect("run node");
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        matches!(output.status.code(), Some(0 | 2)),
        "{name}: a CRD object is invalid: {said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    said.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|line| {
            let verdict = match line["valid"].as_bool() {
                Some(true) => "valid",
                _ => "no schema",
            };
            let group = line["apiVersion"]
                .as_str()
                .unwrap_or("")
                .split('/')
                .next()
                .unwrap_or("")
                .to_owned();
            format!(
                "{} ({group}): {verdict}",
                line["kind"].as_str().unwrap_or("")
            )
        })
        .collect()
}
