//! The Flintlock face over gRPC, driven by a client that is not ember's:
//! Python stubs generated in the test with grpcio-tools from ember's
//! `.proto` files (wire-identical to Flintlock's), as Cluster API's microVM
//! provider (CAPMVM), `fl` and hammertime call flintlockd. Pods of the test
//! guest stand in for Linux. Also the HTTP face's protojson fidelity.
//!
//! Each call mirrors the generated Go client's method of the same name
//! (`MicroVMClient.CreateMicroVM`, ... in flintlock's
//! `api/services/microvm/v1alpha1/microvms_grpc.pb.go`), which CAPMVM's
//! `internal/services/microvm` uses.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ember_tests::*;
use serde_json::{json, Value};

const TOKEN: &str = "s3cret-token";

fn make_oci(out: &Path, spec: Value) {
    let st = Command::new(python())
        .arg(workspace_root().join("tests/fixtures/make_oci.py"))
        .arg(out)
        .arg(spec.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "make_oci.py failed");
}

fn script() -> PathBuf {
    workspace_root().join("tests/fixtures/flintlock_grpc.py")
}

/// The generated Python client (in `dir/pyclient`).
fn gen_client(dir: &Path) -> PathBuf {
    ensure_grpcio();
    let out = dir.join("pyclient");
    let st = Command::new(python())
        .arg(script())
        .arg("gen")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "grpcio-tools could not generate the client");
    out
}

/// emberd with the gRPC endpoint on a free loopback port; returns it and
/// `host:port`.
fn start(tag: &str, uid: u32, grpc_flags: &[&str]) -> (Emberd, String) {
    let mut flags = vec![
        "--flintlock-max-retries",
        "3",
        "--flintlock-backoff-ms",
        "100",
        "--grpc-endpoint",
        "127.0.0.1:0",
    ];
    flags.extend_from_slice(grpc_flags);
    let d = Emberd::start(tag, uid, &flags);
    let addr = wait_for(PATIENCE, || {
        d.err()
            .lines()
            .find_map(|l| l.strip_prefix("emberd: Flintlock gRPC on "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
    })
    .unwrap_or_else(|| panic!("no gRPC endpoint announced: {}", d.err()));
    (d, addr)
}

struct Client {
    gen: PathBuf,
    target: String,
    opts: Value,
}

impl Client {
    /// One call; `(ok, reply or {code, details})`.
    fn call(&self, method: &str, req: Value) -> Value {
        let out = Command::new(python())
            .arg(script())
            .arg("call")
            .arg(&self.gen)
            .arg(&self.target)
            .arg(method)
            .arg(req.to_string())
            .arg(self.opts.to_string())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "{method}: not JSON ({e}): {text} / {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
    fn ok(&self, method: &str, req: Value) -> Value {
        let r = self.call(method, req);
        assert_eq!(r["ok"], true, "{method}: {r}");
        r["reply"].clone()
    }
    fn code(&self, method: &str, req: Value) -> String {
        let r = self.call(method, req);
        assert_eq!(r["ok"], false, "{method} should fail: {r}");
        r["code"].as_str().unwrap().to_string()
    }
}

/// Images of a CAPMVM-shaped MicroVM: the kernel image (the PVH test guest
/// at boot/vmlinux), a root filesystem and a data volume.
fn images(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let kernel = dir.join("kernel-oci");
    make_oci(
        &kernel,
        json!({"ref": "kernel:latest", "layers": [
            {"dirs": ["boot"], "files": {"boot/vmlinux": {"from": PVH_ELF, "mode": 0o755}}}
        ]}),
    );
    let root = dir.join("root-oci");
    make_oci(
        &root,
        json!({"ref": "rootfs:latest", "layers": [{"dirs": ["etc"], "files": {"etc/hostname": "capmvm\n"}}]}),
    );
    let data = dir.join("data-oci");
    make_oci(
        &data,
        json!({"ref": "data:latest", "layers": [{"files": {"hello": "data\n"}}]}),
    );
    (kernel, root, data)
}

fn b64(s: &str) -> String {
    use std::fmt::Write;
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                let _ = write!(out, "{}", T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A spec shaped as CAPMVM's `MicroVMMachine` builds it (proto field names,
/// as the Python client's ParseDict reads them like Go's structs).
fn capmvm_spec(kernel: &Path, root: &Path, data: &Path, name: &str) -> Value {
    json!({
        "id": name, "namespace": "capmvm", "labels": {"cluster.x-k8s.io/cluster-name": "c1"},
        "vcpu": 1, "memory_in_mb": 1024,
        "kernel": {"image": kernel, "filename": "boot/vmlinux", "add_network_config": true,
                   "cmdline": {"ember.test": "cmdline", "console": "ttyS0"}},
        "root_volume": {"id": "root", "is_read_only": false, "source": {"container_source": root}},
        "additional_volumes": [{"id": "data", "is_read_only": true, "mount_point": "/mnt/data",
                                "source": {"container_source": data}}],
        "interfaces": [{"device_id": "eth0", "type": "TAP", "guest_mac": "06:00:0a:4d:00:02",
                        "address": {"address": "10.77.0.2/24", "gateway": "10.77.0.1", "nameservers": ["10.77.0.1"]}}],
        "metadata": {
            "meta-data": b64("local-hostname: c1-node\n"),
            "user-data": b64("#cloud-config\nruncmd: [kubeadm join]\n"),
            "vendor-data": b64("#cloud-config\npackages: [htop]\n"),
            "network-config": b64("version: 2\n"),
        }
    })
}

fn wait_state(c: &Client, uid: &str, want: &str) -> Value {
    wait_for(PATIENCE, || {
        let r = c.call("GetMicroVM", json!({"uid": uid}));
        (r["reply"]["microvm"]["status"]["state"] == want).then(|| r["reply"]["microvm"].clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "{uid} never reached {want}: {}",
            c.call("GetMicroVM", json!({"uid": uid}))
        )
    })
}

fn mtype(img: &Path, file: &str) -> String {
    let out = Command::new("mtype")
        .arg("-i")
        .arg(img)
        .arg(format!("::{file}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn capmvm_spec_over_grpc_create_list_stream_get_delete() {
    let (d, addr) = start(
        "flgrpc",
        10540,
        &["--insecure", "--basic-auth-token", TOKEN],
    );
    let gen = gen_client(d.dir.path());
    let c = Client {
        gen: gen.clone(),
        target: addr.clone(),
        opts: json!({"token": TOKEN}),
    };
    let (kernel, root, data) = images(d.dir.path());
    let spec = capmvm_spec(&kernel, &root, &data, "c1-node-0");

    // CreateMicroVM answers PENDING at once with the stored spec.
    let r = c.ok("CreateMicroVM", json!({"microvm": spec}));
    let m = &r["microvm"];
    assert_eq!(m["status"]["state"], "PENDING", "{r}");
    let uid = m["spec"]["uid"].as_str().unwrap().to_string();
    assert_eq!(uid.len(), 26, "{uid}");
    assert_eq!(m["spec"]["memoryInMb"], 1024);
    assert_eq!(m["spec"]["labels"]["cluster.x-k8s.io/cluster-name"], "c1");
    assert!(m["spec"]["createdAt"].as_str().is_some(), "{m}");

    // The reconcile (the same one the HTTP face starts) boots it.
    let m = wait_state(&c, &uid, "CREATED");
    let vols = m["status"]["volumes"].as_object().unwrap();
    assert_eq!(
        vols.keys().collect::<Vec<_>>(),
        ["data", "root"],
        "volumes keyed by spec id: {m}"
    );
    assert_eq!(vols["root"]["mount"]["type"], "DEV");
    let tap = m["status"]["networkInterfaces"]["eth0"]["hostDeviceName"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "{tap}"
    );
    assert_eq!(m["spec"]["interfaces"][0]["type"], "TAP");
    assert_eq!(m["spec"]["additionalVolumes"][0]["mountPoint"], "/mnt/data");

    // The guest booted with the cmdline map and the network config (its
    // `cmdline` mode prints its command line).
    let name = format!("fl-{}", uid.to_lowercase());
    let logs = wait_for(PATIENCE, || {
        let l = String::from_utf8_lossy(
            &http(&d.sock, "GET", &format!("/instances/{name}/logs"), None).body,
        )
        .to_string();
        // "done" follows the whole cmdline line.
        l.contains("ember-guest: done").then_some(l)
    })
    .expect("guest booted");
    let cmdline = logs
        .lines()
        .find(|l| l.contains("cmdline:"))
        .unwrap_or_default();
    assert!(cmdline.contains("ember.test=cmdline"), "{cmdline}");
    assert!(cmdline.contains("console=ttyS0"), "{cmdline}");
    assert!(
        cmdline.contains("ip=10.77.0.2::10.77.0.1:255.255.255.0:"),
        "{cmdline}"
    );

    // The cidata disk: metadata as given, instance id added, the data
    // volume mounted at its mount point by cloud-init (vdb).
    let all = http(&d.sock, "GET", "/volumes", None).json();
    let cid = all
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["Name"].as_str().unwrap().ends_with("--cidata"))
        .expect("cidata volume")["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let img = d
        .dir
        .join("state")
        .join("volumes")
        .join(format!("{cid}.img"));
    let vendor = mtype(&img, "vendor-data");
    assert!(
        vendor.starts_with("#cloud-config\npackages: [htop]\n"),
        "{vendor}"
    );
    assert!(
        vendor.contains("mounts:\n- [\"vdb\", \"/mnt/data\"]"),
        "{vendor}"
    );
    let meta = mtype(&img, "meta-data");
    assert!(
        meta.contains("local-hostname: c1-node") && meta.contains(&uid),
        "{meta}"
    );
    assert_eq!(mtype(&img, "network-config"), "version: 2\n");
    assert!(mtype(&img, "user-data").contains("kubeadm join"));

    // ListMicroVMs (with and without name), ListMicroVMsStream.
    let l = c.ok("ListMicroVMs", json!({"namespace": "capmvm"}));
    assert_eq!(l["microvm"].as_array().unwrap().len(), 1, "{l}");
    let l = c.ok(
        "ListMicroVMs",
        json!({"namespace": "capmvm", "name": "other"}),
    );
    assert_eq!(l["microvm"].as_array().unwrap().len(), 0, "{l}");
    let s = c.ok("ListMicroVMsStream", json!({"namespace": "capmvm"}));
    assert_eq!(s.as_array().unwrap().len(), 1, "{s}");
    assert_eq!(s[0]["microvm"]["spec"]["uid"], uid.as_str());
    assert_eq!(s[0]["microvm"]["status"]["state"], "CREATED");
    assert_eq!(c.code("ListMicroVMsStream", json!({})), "INVALID_ARGUMENT");

    // The HTTP face sees the same MicroVM.
    let (code, v) = d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!(code, 200);
    assert_eq!(v["microvm"]["status"]["state"], "CREATED");

    // ALREADY_EXISTS, INVALID_ARGUMENT.
    assert_eq!(
        c.code("CreateMicroVM", json!({"microvm": spec})),
        "ALREADY_EXISTS"
    );
    assert_eq!(c.code("CreateMicroVM", json!({})), "INVALID_ARGUMENT");
    let mut bad = spec.clone();
    bad["id"] = json!("other");
    bad["vcpu"] = json!(99);
    assert_eq!(
        c.code("CreateMicroVM", json!({"microvm": bad})),
        "INVALID_ARGUMENT"
    );
    let mut mac = spec.clone();
    mac["id"] = json!("other");
    mac["interfaces"][0]["type"] = json!("MACVTAP");
    let r = c.call("CreateMicroVM", json!({"microvm": mac}));
    assert_eq!(r["code"], "INVALID_ARGUMENT", "{r}");
    // No --parent-iface here: MACVTAP is refused, naming the flag.
    assert!(
        r["details"].as_str().unwrap().contains("--parent-iface"),
        "{r}"
    );
    assert_eq!(c.code("GetMicroVM", json!({})), "INVALID_ARGUMENT");
    assert_eq!(c.code("DeleteMicroVM", json!({})), "INVALID_ARGUMENT");

    // Wrong and missing tokens: UNAUTHENTICATED on every service.
    for opts in [json!({}), json!({"token": "wrong"})] {
        let bad = Client {
            gen: gen.clone(),
            target: addr.clone(),
            opts,
        };
        assert_eq!(
            bad.code("GetMicroVM", json!({"uid": uid})),
            "UNAUTHENTICATED"
        );
        assert_eq!(
            bad.code("ListMicroVMsStream", json!({"namespace": "capmvm"})),
            "UNAUTHENTICATED"
        );
        assert_eq!(bad.code("Health", json!({})), "UNAUTHENTICATED");
    }
    // Health and reflection, as flintlockd registers them.
    let h = c.ok(
        "Health",
        json!({"service": "microvm.services.api.v1alpha1.MicroVM"}),
    );
    assert_eq!(h["status"], "SERVING", "{h}");
    let services = c.ok("Reflect", json!({}));
    assert!(
        services
            .as_array()
            .unwrap()
            .contains(&json!("microvm.services.api.v1alpha1.MicroVM")),
        "{services}"
    );

    // DeleteMicroVM; then NOT_FOUND.
    c.ok("DeleteMicroVM", json!({"uid": uid}));
    assert_eq!(c.code("GetMicroVM", json!({"uid": uid})), "NOT_FOUND");
    assert_eq!(c.code("DeleteMicroVM", json!({"uid": uid})), "NOT_FOUND");
    let gone = wait_for(PATIENCE, || {
        (!Path::new(&format!("/sys/class/net/{tap}")).exists()).then_some(())
    });
    assert!(gone.is_some(), "TAP {tap} left behind");
    assert_eq!(
        c.ok("ListMicroVMs", json!({"namespace": "capmvm"}))["microvm"],
        json!([])
    );

    // INTERNAL: the state file cannot be written (a directory stands in
    // its way), so the MicroVM cannot be recorded.
    let state = d.dir.join("state").join("state.json");
    let saved = std::fs::read(&state).unwrap();
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir_all(state.join("blocker")).unwrap();
    let mut other = spec.clone();
    other["id"] = json!("c1-node-1");
    assert_eq!(
        c.code("CreateMicroVM", json!({"microvm": other})),
        "INTERNAL"
    );
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::write(&state, saved).unwrap();
    assert_eq!(
        c.ok("ListMicroVMs", json!({"namespace": "capmvm"}))["microvm"],
        json!([]),
        "a create that failed left no record"
    );
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian openssl) is needed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and `name`.crt/.key signed by it (`san`: subjectAltName).
fn ca_and_cert(dir: &Path, ca: &str, name: &str, san: &str) {
    if !dir.join(format!("{ca}.crt")).exists() {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

#[test]
fn tls_with_client_validation() {
    let certs = TempDir::new("flgrpc-certs");
    let p = |f: &str| certs.join(f).display().to_string();
    ca_and_cert(certs.path(), "ca", "server", "DNS:localhost,IP:127.0.0.1");
    ca_and_cert(certs.path(), "ca", "client", "DNS:client");
    ca_and_cert(certs.path(), "rogue-ca", "rogue", "DNS:client");
    let (server_crt, server_key, ca_crt) = (p("server.crt"), p("server.key"), p("ca.crt"));
    let (d, addr) = start(
        "flgrpc-tls",
        10541,
        &[
            "--tls-cert",
            &server_crt,
            "--tls-key",
            &server_key,
            "--tls-client-validate",
            "--tls-client-ca",
            &ca_crt,
        ],
    );
    let gen = gen_client(d.dir.path());
    let client = |opts: Value| Client {
        gen: gen.clone(),
        target: addr.clone(),
        opts,
    };
    // A client that connects and stalls in the handshake delays no one.
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut stalled, b"\x16\x03\x01").unwrap();
    // A client certificate from the CA: served.
    let good = client(json!({"ca": p("ca.crt"), "cert": p("client.crt"), "key": p("client.key")}));
    assert_eq!(
        good.ok("ListMicroVMs", json!({"namespace": "x"}))["microvm"],
        json!([])
    );
    assert_eq!(
        good.code("GetMicroVM", json!({"uid": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})),
        "NOT_FOUND"
    );
    // No client certificate, or one from another CA: no session.
    let none = client(json!({"ca": p("ca.crt")}));
    assert_eq!(
        none.code("ListMicroVMs", json!({"namespace": "x"})),
        "UNAVAILABLE"
    );
    let rogue = client(json!({"ca": p("ca.crt"), "cert": p("rogue.crt"), "key": p("rogue.key")}));
    assert_eq!(
        rogue.code("ListMicroVMs", json!({"namespace": "x"})),
        "UNAVAILABLE"
    );
    // The HTTP face (same loop) answers meanwhile too.
    assert_eq!(d.req("GET", "/v1alpha1/microvm/x", None).0, 200);
    drop(stalled);
    // Plain text to a TLS endpoint: no answer either.
    let plain = client(json!({}));
    assert_eq!(
        plain.code("ListMicroVMs", json!({"namespace": "x"})),
        "UNAVAILABLE"
    );
    drop(d);

    // Flags that do not fit are refused at start.
    for (flags, needle) in [
        (vec!["--grpc-endpoint", "127.0.0.1:0"], "--insecure"),
        (
            vec![
                "--grpc-endpoint",
                "127.0.0.1:0",
                "--tls-cert",
                &server_crt,
                "--tls-key",
                &server_key,
                "--tls-client-validate",
            ],
            "--tls-client-ca",
        ),
        (vec!["--basic-auth-token", "x"], "--grpc-endpoint"),
    ] {
        let dir = TempDir::new("flgrpc-flags");
        let out = Command::new(bin("emberd"))
            .arg("--socket")
            .arg(dir.join("s.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(&flags)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flags:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
}

/// The HTTP face reads protojson as grpc-gateway does.
#[test]
fn http_face_protojson_fidelity() {
    let (d, addr) = start("flgrpc-http", 10542, &["--insecure"]);
    let (kernel, root, data) = images(d.dir.path());
    // Proto field names, numeric enum, integers as strings, no id.
    let mut body = capmvm_spec(&kernel, &root, &data, "");
    body.as_object_mut().unwrap().remove("id");
    body["memory_in_mb"] = json!("2048");
    body["interfaces"][0]["type"] = json!(1);
    let (code, v) = d.req("POST", "/v1alpha1/microvm", Some(&body.to_string()));
    assert_eq!(code, 200, "{v}");
    let m = &v["microvm"];
    assert_eq!(m["spec"]["memoryInMb"], 2048, "proto name honoured: {m}");
    assert_eq!(m["spec"]["interfaces"][0]["type"], "TAP");
    assert_eq!(m["spec"]["rootVolume"]["id"], "root");
    assert_eq!(m["spec"]["additionalVolumes"][0]["mountPoint"], "/mnt/data");
    let id = m["spec"]["id"].as_str().unwrap();
    assert_eq!(id.len(), 26, "a generated id: {id}");
    let uid = m["spec"]["uid"].as_str().unwrap().to_string();
    // lowerCamelCase spelling is read too (and "type" by name).
    let mut camel = json!({
        "id": "camel", "memoryInMb": 1024,
        "kernel": {"image": kernel, "filename": "boot/vmlinux", "addNetworkConfig": false},
        "rootVolume": {"id": "root", "isReadOnly": true, "source": {"containerSource": root}},
        "interfaces": [{"deviceId": "eth0", "type": "TAP"}]
    });
    let (code, v) = d.req("POST", "/v1alpha1/microvm", Some(&camel.to_string()));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["microvm"]["spec"]["rootVolume"]["isReadOnly"], true);
    let camel_uid = v["microvm"]["spec"]["uid"].as_str().unwrap().to_string();
    camel["interfaces"][0]["type"] = json!(7);
    camel["id"] = json!("camel2");
    let (code, e) = d.req("POST", "/v1alpha1/microvm", Some(&camel.to_string()));
    assert_eq!((code, e["code"].clone()), (400, json!(3)), "{e}");

    // Created through HTTP, reconciled; status.volumes keyed by volume id.
    let v = wait_for(PATIENCE, || {
        let (_, v) = d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None);
        (v["microvm"]["status"]["state"] == "CREATED").then_some(v)
    })
    .expect("CREATED");
    let keys: Vec<&String> = v["microvm"]["status"]["volumes"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(keys, ["data", "root"], "{v}");

    // uid lookups: lowercase (as the UniK face names the instance) and the
    // UniK instance name itself find it; the UniK face serves fl-<uid>.
    let low = uid.to_lowercase();
    for key in [low.clone(), format!("fl-{low}")] {
        let (code, v) = d.req("GET", &format!("/v1alpha1/microvm/{key}"), None);
        assert_eq!(code, 200, "{key}: {v}");
        assert_eq!(v["microvm"]["spec"]["uid"], uid.as_str());
    }
    assert_eq!(
        http(&d.sock, "GET", &format!("/instances/fl-{low}"), None).status,
        200
    );

    // The gRPC face sees the HTTP-created MicroVMs: one record, one reconcile.
    let c = Client {
        gen: gen_client(d.dir.path()),
        target: addr,
        opts: json!({}),
    };
    let l = c.ok("ListMicroVMs", json!({"namespace": "default"}));
    assert_eq!(l["microvm"].as_array().unwrap().len(), 1, "{l}");
    let l = c.ok("ListMicroVMs", json!({}));
    assert_eq!(
        l["microvm"].as_array().unwrap().len(),
        2,
        "every namespace: {l}"
    );
    assert_eq!(
        c.ok("GetMicroVM", json!({"uid": low}))["microvm"]["spec"]["uid"],
        uid.as_str()
    );

    // Get of an unknown uid: 404 with code 5, an error object, not a list.
    let (code, e) = d.req("GET", "/v1alpha1/microvm/01ARZ3NDEKTSV4RRFFQ69G5FAV", None);
    assert_eq!((code, e["code"].clone()), (404, json!(5)), "{e}");
    assert!(e["message"].is_string() && e["details"].is_array(), "{e}");
    // Deleted: 404 too (delete through gRPC, then HTTP).
    c.ok("DeleteMicroVM", json!({"uid": uid}));
    let (code, e) = d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!((code, e["code"].clone()), (404, json!(5)), "{e}");
    let (code, _) = d.req("DELETE", &format!("/v1alpha1/microvm/{camel_uid}"), None);
    assert_eq!(code, 200);
}
