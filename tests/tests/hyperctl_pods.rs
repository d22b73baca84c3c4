//! hyperctl 1.1.0's pod and container commands replayed byte for byte
//! against emberd with real pod VMs: `create`, `run -d`, `start`, `list`
//! (with `-p`/`-m` filters), `pause`, `unpause`, `ports`, `kill` (container
//! and `-p`), `stop` (pod and `-c`), `start -c`, `commit`, `rm` (pod and
//! `-c`), `create -c`, `run -v`, pod files, interfaces and port mappings,
//! and the `/pod/info` and `/container/info` lookups `run` and `logs` make.
//! Each step names the hyperctl function it mirrors and asserts on the
//! fields hyperctl reads.
//!
//! As in tests/tests/hyperd_pods.rs, the pod kernel is ember's test guest
//! in its `pod-agent` mode (this host's KVM cannot boot Linux): emberd,
//! the jailer, ember-vmm, virtio-blk and virtio-vsock all run for real.

use ember_tests::hyperctl::Hyperctl;
use ember_tests::*;
use serde_json::{json, Value};

const UID: u32 = 10509;

fn start(tag: &str) -> Emberd {
    let agent = bin("ember-agent");
    Emberd::start(
        tag,
        UID,
        &[
            "--pod-kernel",
            PVH_ELF,
            "--pod-boot-args",
            "ember.test=pod-agent",
            "--pod-agent",
            agent.to_str().unwrap(),
            "--pod-rootfs-mb",
            "16",
            "--pod-stop-timeout",
            "1",
            // Port mappings listen on loopback only in tests.
            "--pod-port-bind",
            "127.0.0.1",
        ],
    )
}

fn body(r: &HttpResponse) -> String {
    String::from_utf8_lossy(&r.body).to_string()
}

/// hyperctl's engine.Env decoding of a command reply: Code 0 and the ID.
fn env_ok(r: &HttpResponse, status: u16) -> String {
    assert_eq!(r.status, status, "{}", body(r));
    let v = r.json();
    assert_eq!(v["Code"], 0, "{v}");
    v["ID"].as_str().unwrap().to_string()
}

/// client/api/list.go: (*Client).List(item, pod, vm); client/list.go
/// splits each entry on ':'.
fn list(h: &Hyperctl, item: &str, pod: &str, vm: &str) -> Vec<Vec<String>> {
    let mut q = format!("item={item}");
    if !pod.is_empty() {
        q.push_str(&format!("&pod={}", urlencode(pod)));
    }
    if !vm.is_empty() {
        q.push_str(&format!("&vm={}", urlencode(vm)));
    }
    let r = h.call("GET", &format!("/list?{q}"));
    assert_eq!(
        r.status,
        201,
        "hyperd answered /list with 201: {}",
        body(&r)
    );
    let v = r.json();
    assert_eq!(v["item"], item);
    let key = match item {
        "pod" => "podData",
        "vm" => "vmData",
        _ => "cData",
    };
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().split(':').map(str::to_string).collect())
        .collect()
}

fn pod_status(h: &Hyperctl, pod: &str) -> String {
    list(h, "pod", pod, "")[0][3].clone()
}

/// client/api/info.go: (*Client).GetPodInfo(podName) — types.PodInfo.
fn pod_info(h: &Hyperctl, pod: &str) -> Value {
    let r = h.call("GET", &format!("/pod/info?podName={}", urlencode(pod)));
    assert_eq!(r.status, 200, "{}", body(&r));
    r.json()
}

/// client/api/info.go: (*Client).GetContainerInfo(container).
fn container_info(h: &Hyperctl, c: &str) -> Value {
    let r = h.call(
        "GET",
        &format!("/container/info?container={}", urlencode(c)),
    );
    assert_eq!(r.status, 200, "{}", body(&r));
    r.json()
}

/// What client/common_options.go: JsonFromCmdline marshals for
/// `hyperctl run -d busybox` (name "busybox-" + 10 digits; Go drops the
/// empty fields).
fn run_spec(name: &str) -> String {
    format!(
        r#"{{"id":"{name}","resource":{{"vcpu":1,"memory":128}},"log":{{}},"containers":[{{"name":"{name}","image":"busybox","restartPolicy":"never"}}]}}"#
    )
}

fn wait_status(h: &Hyperctl, pod: &str, want: &str) {
    wait_for(PATIENCE, || (pod_status(h, pod) == want).then_some(()))
        .unwrap_or_else(|| panic!("pod {pod} never became {want}: {}", pod_status(h, pod)));
}

#[test]
fn hyperctl_pod_commands() {
    let d = start("hctl-pods");
    let h = Hyperctl::new(&d.sock);
    d.hyperd_import(
        "busybox:latest",
        json!({"layers": [{"dirs": ["bin"], "files": {"bin/sh": "#!stub\n"}}],
               "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}}),
    );

    // `hyperctl create busybox` — client/api/create.go: (*Client).CreatePod.
    // hyperctl reads Code and ID; 404 makes it pull and retry.
    let r = h.call_json("POST", "/pod/create", &run_spec("busybox-0000000001"));
    let created = env_ok(&r, 201);
    assert!(created.starts_with("pod-"), "{created}");
    let r = h.call_json(
        "POST",
        "/pod/create",
        r#"{"id":"nope-0000000002","resource":{"vcpu":1,"memory":128},"log":{},"containers":[{"name":"nope-0000000002","image":"nosuch","restartPolicy":"never"}]}"#,
    );
    assert_eq!(r.status, 404, "hyperctl pulls on 404: {}", body(&r));

    // `hyperctl run -d busybox` — CreatePod, then client/api/start.go:
    // (*Client).StartPod (podId only).
    let pod = env_ok(
        &h.call_json("POST", "/pod/create", &run_spec("busybox-0000000003")),
        201,
    );
    let r = h.call("POST", &format!("/pod/start?podId={pod}"));
    assert_eq!(r.status, 200, "{}", body(&r));

    // `hyperctl list`, `list -p`, `list -m`, `list container`, `list vm`.
    let all = list(&h, "pod", "", "");
    assert_eq!(all.len(), 2, "{all:?}");
    let me = list(&h, "pod", &pod, "");
    assert_eq!(me.len(), 1);
    assert_eq!(
        (me[0][0].as_str(), me[0][1].as_str(), me[0][3].as_str()),
        (pod.as_str(), "busybox-0000000003", "running")
    );
    let vm = me[0][2].clone();
    assert!(vm.starts_with("vm-"), "{vm}");
    assert_eq!(list(&h, "pod", "", &vm), me, "list -m {vm}");
    assert!(
        list(&h, "pod", &created, &vm).is_empty(),
        "pod and vm disagree"
    );
    let cs = list(&h, "container", &pod, "");
    assert_eq!(cs.len(), 1, "{cs:?}");
    assert_eq!(
        (cs[0][1].as_str(), cs[0][2].as_str(), cs[0][3].as_str()),
        ("busybox-0000000003", pod.as_str(), "running")
    );
    let cid = cs[0][0].clone();
    assert_eq!(
        list(&h, "vm", "", ""),
        [vec![vm.clone(), pod.clone(), "associated".into()]]
    );
    assert_eq!(list(&h, "vm", "", &vm).len(), 1);

    // The lookups `run` (attached) and `logs` make before their streams.
    let info = pod_info(&h, &pod);
    assert_eq!(info["podID"], pod.as_str());
    assert_eq!(info["podName"], "busybox-0000000003");
    assert_eq!(info["vm"], vm.as_str());
    assert_eq!(info["kind"], "Pod");
    assert_eq!(info["status"]["phase"], "Running");
    // client/run.go uses Spec.Containers[0].ContainerID for the tty size.
    assert_eq!(info["spec"]["containers"][0]["containerID"], cid.as_str());
    assert_eq!(info["spec"]["containers"][0]["image"], "busybox");
    assert_eq!(info["spec"]["vcpu"], 1);
    assert_eq!(info["spec"]["memory"], 128);
    assert_eq!(info["status"]["containerStatus"][0]["phase"], "running");
    let ci = container_info(&h, "busybox-0000000003");
    assert_eq!(ci["podID"], pod.as_str());
    assert_eq!(ci["container"]["containerID"], cid.as_str());
    assert_eq!(ci["container"]["args"], json!(["/bin/sh"]));
    // client/api/misc.go: GetExitCode(wait=false) reads Status.Phase and
    // Status.Terminated.
    assert_eq!(ci["status"]["phase"], "running");
    assert!(ci["status"]["terminated"].is_object());
    let r = h.call("GET", "/container/info?container=nosuch");
    assert_eq!(r.status, 404);

    // `hyperctl pause` / `unpause` — client/api/pause.go: PausePod,
    // UnpausePod. hyperd answered 204 with no body.
    let r = h.call("POST", &format!("/pod/pause?podId={pod}"));
    assert_eq!((r.status, r.body.len()), (204, 0), "{}", body(&r));
    assert_eq!(pod_status(&h, &pod), "paused");
    assert_eq!(list(&h, "vm", "", &vm)[0][2], "paused");
    assert_eq!(pod_info(&h, &pod)["status"]["phase"], "Paused");
    let r = h.call("POST", &format!("/pod/pause?podId={pod}"));
    assert_eq!(r.status, 409, "already paused: {}", body(&r));
    // A paused pod's agent cannot answer: stop says so.
    let r = h.call("POST", &format!("/pod/stop?podId={pod}&stopVm=yes"));
    assert_eq!(r.status, 409, "{}", body(&r));
    let r = h.call("POST", &format!("/pod/unpause?podId={pod}"));
    assert_eq!((r.status, r.body.len()), (204, 0), "{}", body(&r));
    assert_eq!(pod_status(&h, &pod), "running");

    // `hyperctl ports ls|add|delete` — client/api/portmapping.go.
    let r = h.call("GET", &format!("/pod/{pod}/portmappings"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"portMappings": []}));
    let r = h.call("GET", "/pod/pod-nosuchpodx/portmappings");
    assert_eq!(r.status, 404, "hyperctl: pod not found");
    let rules = r#"[{"containerPort":"80","hostPort":"8080","protocol":"tcp"}]"#;
    let r = h.call_json("PUT", &format!("/pod/{pod}/portmappings/add"), rules);
    assert_eq!(r.status, 400, "{}", body(&r));
    assert!(body(&r).contains("need the pod's address"), "{}", body(&r));
    let r = h.call_json("PUT", &format!("/pod/{pod}/portmappings/delete"), rules);
    assert_eq!(r.status, 204, "{}", body(&r));
    let r = h.call_json("PUT", &format!("/pod/{pod}/portmappings/swap"), rules);
    assert_eq!(r.status, 400);

    // `hyperctl kill busybox-0000000003` — client/api/kill.go:
    // KillContainer(container, 9): /container/kill answered 201.
    let r = h.call(
        "POST",
        "/container/kill?container=busybox-0000000003&signal=9",
    );
    assert_eq!(r.status, 201, "{}", body(&r));
    wait_status(&h, &pod, "failed");
    let ci = container_info(&h, &cid);
    assert_eq!(ci["status"]["phase"], "failed");
    assert_eq!(ci["status"]["terminated"]["exitCode"], 137);
    assert!(d
        .logs(&vm)
        .contains(&format!("pod-agent signal 9 to {cid}")));

    // `hyperctl stop` — client/api/stop.go: StopPod(podId, "yes"); hyperctl
    // reads Code and Cause.
    let r = h.call("POST", &format!("/pod/stop?podId={pod}&stopVm=yes"));
    assert_eq!(env_ok(&r, 200), pod);
    assert_eq!(r.json()["Cause"], "");
    assert!(list(&h, "vm", "", "").is_empty());

    // `hyperctl commit <container> snap:1` — client/api/commit.go: Commit
    // (author, change, message, pause, container, repo, tag).
    let r = h.call(
        "POST",
        &format!("/container/commit?author=&change=null&container={cid}&message=&pause=no&repo=snap&tag=1"),
    );
    let img = env_ok(&r, 200);
    assert!(!img.is_empty());
    let r = h.call("GET", "/images/get?all=no&quiet=no");
    assert!(body(&r).contains("\"snap:1:"), "{}", body(&r));

    // `hyperctl create -c <pod> busybox` — client/api/create.go:
    // CreateContainer: the UserContainer JSON, answered 201 {"ID"}.
    let r = h.call_json(
        "POST",
        &format!("/container/create?podId={pod}"),
        r#"{"name":"side-0000000004","image":"busybox","command":["/bin/sh","-c","true"],"restartPolicy":"never"}"#,
    );
    assert_eq!(r.status, 201, "{}", body(&r));
    let side = r.json()["ID"].as_str().unwrap().to_string();
    // server/router/container: postContainerRename (oldName, newName).
    let r = h.call(
        "POST",
        "/container/rename?newName=side&oldName=side-0000000004",
    );
    assert_eq!(env_ok(&r, 200), "side");
    // server/router/pod: postPodLabels (podId, labels, override) — 201.
    let r = h.call(
        "POST",
        &format!(
            "/pod/labels?labels={}&override=false&podId={pod}",
            urlencode(r#"{"tier":"web"}"#)
        ),
    );
    assert_eq!(env_ok(&r, 201), pod);
    let r = h.call(
        "POST",
        &format!(
            "/pod/labels?labels={}&override=false&podId={pod}",
            urlencode(r#"{"tier":"db"}"#)
        ),
    );
    assert_eq!(r.status, 409, "{}", body(&r));
    assert_eq!(pod_info(&h, &pod)["spec"]["labels"], json!({"tier": "web"}));

    // `hyperctl start <pod>` — both containers run in a new VM.
    let r = h.call("POST", &format!("/pod/start?podId={pod}"));
    assert_eq!(r.status, 200, "{}", body(&r));
    let cs = list(&h, "container", &pod, "");
    assert_eq!(cs.len(), 2, "{cs:?}");
    assert_eq!(cs[1][0], side);
    assert_eq!(cs[1][1], "side");
    assert!(cs.iter().all(|c| c[3] == "running"), "{cs:?}");
    let vm2 = list(&h, "pod", &pod, "")[0][2].clone();
    // A running pod gets no new container.
    let r = h.call_json(
        "POST",
        &format!("/container/create?podId={pod}"),
        r#"{"name":"late","image":"busybox"}"#,
    );
    assert_eq!(r.status, 409, "{}", body(&r));

    // `hyperctl stop -c side` — client/api/stop.go: StopContainer; the
    // pod and its VM stay up.
    let r = h.call("POST", "/container/stop?container=side");
    assert_eq!(env_ok(&r, 200), side);
    let cs = list(&h, "container", &pod, "");
    assert_eq!(
        (cs[1][3].as_str(), cs[0][3].as_str()),
        ("failed", "running")
    );
    assert_eq!(
        container_info(&h, "side")["status"]["terminated"]["exitCode"],
        143
    );
    // `hyperctl start -c` — client/api/start.go: StartContainer: a
    // container starts with its pod; refused with the way to do it.
    let r = h.call("POST", "/container/start?container=side");
    assert_eq!(r.status, 409, "{}", body(&r));
    assert!(body(&r).contains("pod/start"), "{}", body(&r));

    // `hyperctl kill -s TERM -p <pod>` — client/api/kill.go: KillPod
    // (podName, signal): every container gets it.
    let r = h.call("POST", &format!("/pod/kill?podName={pod}&signal=15"));
    assert_eq!(r.status, 200, "{}", body(&r));
    wait_status(&h, &pod, "failed");
    assert!(
        list(&h, "container", &pod, "")
            .iter()
            .all(|c| c[3] == "failed"),
        "SIGTERM ends both"
    );
    // `hyperctl kill -p <pod>` (signal 9): the whole VM goes.
    let r = h.call("POST", &format!("/pod/kill?podName={pod}&signal=9"));
    assert_eq!(r.status, 200, "{}", body(&r));
    assert!(list(&h, "vm", "", &vm2).is_empty());
    assert_eq!(list(&h, "pod", &pod, "")[0][2], "", "no VM any more");

    // `hyperctl rm -c side` — client/api/rm.go: RemoveContainer (204).
    let r = h.call("POST", "/container/remove?container=side");
    assert_eq!((r.status, r.body.len()), (204, 0), "{}", body(&r));
    assert_eq!(list(&h, "container", &pod, "").len(), 1);

    // `hyperctl rm <pod>` — client/api/rm.go: RmPod reads Code.
    for p in [&pod, &created] {
        let r = h.call("DELETE", &format!("/pod?podId={p}"));
        assert_eq!(env_ok(&r, 200), *p);
    }
    assert!(list(&h, "pod", "", "").is_empty());
    let r = h.call("DELETE", &format!("/pod?podId={pod}"));
    assert_eq!(r.status, 404);
}

/// hyperctl's `-v` and a pod file's volumes and files, in a real pod VM:
/// the guest checks every volume disk's ext4 superblock through
/// virtio-blk and logs the files it was handed.
#[test]
fn hyperctl_run_with_volumes_and_files() {
    let d = start("hctl-vols");
    let h = Hyperctl::new(&d.sock);
    d.hyperd_import(
        "busybox:latest",
        json!({"layers": [{"dirs": ["bin"], "files": {"bin/sh": "#!stub\n"}}],
               "config": {"Cmd": ["/bin/sh"]}}),
    );
    // An ember volume (UniK's /volumes), empty ext4.
    let (c, v) = d.json(&["-X", "POST", "http://localhost/volumes/shared?size=8"]);
    assert_eq!(c, 201, "{v}");

    // `hyperctl run -d -v /data busybox`: client/common_options.go
    // parseVolume gives an inline volume without source (name + 5 digits).
    let spec = r#"{"id":"busybox-0000000005","resource":{"vcpu":1,"memory":128},"log":{},"containers":[{"name":"busybox-0000000005","image":"busybox","restartPolicy":"never","volumes":[{"path":"/data","volume":"data12345","detail":{"name":"data12345"}}]}]}"#;
    let pod = env_ok(&h.call_json("POST", "/pod/create", spec), 201);
    let r = h.call("POST", &format!("/pod/start?podId={pod}"));
    assert_eq!(r.status, 200, "{}", body(&r));
    let vm = list(&h, "pod", &pod, "")[0][2].clone();
    let cid = list(&h, "container", &pod, "")[0][0].clone();
    let log = d.logs(&vm);
    assert!(log.contains("pod-agent disks 2"), "{log}");
    assert!(
        log.contains(&format!(
            "pod-agent container {cid} volume /dev/vdb at /data ext4 ok"
        )),
        "{log}"
    );
    let vols = || -> Vec<Value> {
        let (c, v) = d.json(&["http://localhost/volumes"]);
        assert_eq!(c, 200);
        v.as_array().unwrap().clone()
    };
    let own = format!("{pod}-vol-data12345");
    assert!(
        vols().iter().any(|v| v["Name"] == own.as_str()),
        "{:?}",
        vols()
    );
    // /pod/info shows the volume and the mount.
    let info = pod_info(&h, &pod);
    assert_eq!(
        info["spec"]["containers"][0]["volumeMounts"][0]["mountPath"],
        "/data"
    );

    // `hyperctl run -p pod.json` (client/common_options.go JsonFromFile
    // sends the file as it is): an ember volume read-only, and a file.
    let podfile = json!({
        "id": "files",
        "containers": [{"name": "app", "image": "busybox",
            "volumes": [{"volume": "shared", "path": "/srv/shared", "readOnly": true}],
            "files": [{"filename": "motd", "path": "/etc/motd", "perm": "0600"}]}],
        "volumes": [{"name": "shared", "source": "shared", "format": "ember"}],
        "files": [{"name": "motd", "encoding": "raw", "content": "welcome\n"}]
    });
    let p2 = env_ok(
        &h.call_json("POST", "/pod/create", &podfile.to_string()),
        201,
    );
    let r = h.call("POST", &format!("/pod/start?podId={p2}"));
    assert_eq!(r.status, 200, "{}", body(&r));
    let vm2 = list(&h, "pod", &p2, "")[0][2].clone();
    let c2 = list(&h, "container", &p2, "")[0][0].clone();
    let log = d.logs(&vm2);
    assert!(
        log.contains(&format!(
            "pod-agent container {c2} volume /dev/vdb at /srv/shared ext4 ok"
        )),
        "{log}"
    );
    // base64 of "welcome\n" is 12 characters; the content is not logged.
    assert!(
        log.contains(&format!(
            "pod-agent container {c2} file /etc/motd mode 384 base64 12"
        )),
        "{log}"
    );
    assert!(!log.contains("welcome"), "{log}");
    let shared = vols().into_iter().find(|v| v["Name"] == "shared").unwrap();
    assert!(
        shared["Attachment"].as_str().is_some_and(|a| !a.is_empty()),
        "attached while the pod runs: {shared}"
    );
    // A second pod cannot take the same ember volume meanwhile.
    let p3 = env_ok(
        &h.call_json(
            "POST",
            "/pod/create",
            &podfile.to_string().replace("\"files\"", "\"files3\""),
        ),
        201,
    );
    let r = h.call("POST", &format!("/pod/start?podId={p3}"));
    assert!(r.status >= 400, "{}", body(&r));
    assert!(body(&r).contains("shared"), "{}", body(&r));

    // Refused with the reason: hyperctl -v /host/dir:/data (a host
    // directory, vfs), a file from a uri.
    let r = h.call_json(
        "POST",
        "/pod/create",
        r#"{"id":"host-0000000006","containers":[{"name":"host-0000000006","image":"busybox","restartPolicy":"never","volumes":[{"path":"/data","volume":"dir12345","detail":{"name":"dir12345","source":"/home/alice/dir","format":"vfs"}}]}]}"#,
    );
    assert_eq!(r.status, 400, "{}", body(&r));
    assert!(
        body(&r).contains("shares no host directory"),
        "{}",
        body(&r)
    );
    let r = h.call_json(
        "POST",
        "/pod/create",
        r#"{"id":"uri","containers":[{"image":"busybox","files":[{"filename":"f","path":"/f"}]}],"files":[{"name":"f","uri":"http://example.com/f"}]}"#,
    );
    assert_eq!(r.status, 400, "{}", body(&r));

    // Stopped pods release the ember volume; removed pods take their own
    // volumes with them.
    for p in [&pod, &p2] {
        let r = h.call("POST", &format!("/pod/stop?podId={p}&stopVm=yes"));
        env_ok(&r, 200);
    }
    let shared = vols().into_iter().find(|v| v["Name"] == "shared").unwrap();
    assert_eq!(shared["Attachment"], "", "{shared}");
    for p in [&pod, &p2, &p3] {
        env_ok(&h.call("DELETE", &format!("/pod?podId={p}")), 200);
    }
    let names: Vec<String> = vols()
        .iter()
        .map(|v| v["Name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["shared"], "the pod's own volume went with it");
}

/// Pod `interfaces` on TAPs: one virtio-net device per interface, backed
/// by a persistent TAP owned by the VMM's uid, eth0's address as the
/// kernel's `ip=`; gone with the VM.
#[test]
fn pod_interfaces_on_taps() {
    let mut d = start("hctl-nics");
    let h = Hyperctl::new(&d.sock);
    d.hyperd_import(
        "busybox:latest",
        json!({"layers": [{"dirs": ["bin"], "files": {"bin/sh": "#!stub\n"}}],
               "config": {"Cmd": ["/bin/sh"]}}),
    );
    // Host ports for the mappings (loopback, as emberd's --pod-port-bind).
    let base = 40000 + (std::process::id() % 5000) as u16 * 4;
    let (tcp_port, udp_port, added) = (base, base + 1, base + 2);
    // `hyperctl run -p pod.json` sends the pod file as it is.
    let podfile = json!({
        "id": "net", "hostname": "nethost",
        "containers": [{"name": "app", "image": "busybox"}],
        "interfaces": [
            {"ip": "10.77.0.2/24", "gateway": "10.77.0.1", "mac": "02:00:00:00:77:02", "ifname": "eth0"},
            {"mac": "02:00:00:00:77:03"}
        ],
        "portmappings": [
            {"containerPort": "80", "hostPort": tcp_port.to_string(), "protocol": "tcp"},
            {"containerPort": "53", "hostPort": udp_port.to_string(), "protocol": "udp"}
        ]
    });
    let pod = env_ok(
        &h.call_json("POST", "/pod/create", &podfile.to_string()),
        201,
    );
    let r = h.call("POST", &format!("/pod/start?podId={pod}"));
    assert_eq!(r.status, 200, "{}", body(&r));
    let vm = list(&h, "pod", &pod, "")[0][2].clone();
    assert!(d.logs(&vm).contains("pod-agent nics 2"), "{}", d.logs(&vm));
    let state: Value =
        serde_json::from_slice(&std::fs::read(d.dir.join("state/state.json")).unwrap()).unwrap();
    let inst = state["instances"]
        .as_object()
        .unwrap()
        .values()
        .find(|i| i["name"] == vm.as_str())
        .unwrap()
        .clone();
    assert!(
        inst["boot_args"]
            .as_str()
            .unwrap()
            .contains("ip=10.77.0.2::10.77.0.1:255.255.255.0:nethost:eth0:off"),
        "{inst}"
    );
    let taps: Vec<String> = inst["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["host_dev_name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(taps.len(), 2);
    assert_eq!(inst["interfaces"][0]["guest_mac"], "02:00:00:00:77:02");
    let link = |tap: &str| {
        std::process::Command::new("ip")
            .args(["-o", "link", "show", tap])
            .output()
            .unwrap()
    };
    for t in &taps {
        let o = link(t);
        assert!(o.status.success(), "TAP {t} exists while the pod runs");
    }
    // The unbridged eth0's TAP holds the gateway address: the host reaches
    // the pod's subnet through it.
    let addr = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show", &taps[0]])
        .output()
        .unwrap();
    let addr = String::from_utf8_lossy(&addr.stdout).to_string();
    assert!(addr.contains("10.77.0.1/24"), "{addr}");
    assert_eq!(pod_info(&h, &pod)["status"]["podIP"], json!(["10.77.0.2"]));

    // Port mappings: the host port listens while the pod runs (the
    // forwarder's data path is runtime::portfwd's test, in a network
    // namespace; this test guest has no TCP stack to answer).
    let listening = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    assert!(listening(tcp_port), "tcp {tcp_port} forwards to the pod");
    // client/api/portmapping.go: ListPortMappings, AddPortMappings,
    // DeletePortMappings on a running pod.
    let r = h.call("GET", &format!("/pod/{pod}/portmappings"));
    let pms = r.json()["portMappings"].clone();
    assert_eq!(pms.as_array().unwrap().len(), 2, "{pms}");
    assert_eq!(pms[0]["hostPort"], tcp_port.to_string());
    assert_eq!(pms[1]["protocol"], "udp");
    let rule = format!(r#"[{{"containerPort":"8080","hostPort":"{added}","protocol":"tcp"}}]"#);
    let r = h.call_json("PUT", &format!("/pod/{pod}/portmappings/add"), &rule);
    assert_eq!(r.status, 204, "{}", body(&r));
    assert!(listening(added), "added at once");
    let r = h.call_json("PUT", &format!("/pod/{pod}/portmappings/add"), &rule);
    assert_eq!(r.status, 409, "the host port is taken: {}", body(&r));
    let r = h.call_json("PUT", &format!("/pod/{pod}/portmappings/delete"), &rule);
    assert_eq!(r.status, 204, "{}", body(&r));
    assert!(!listening(added), "deleted at once");
    assert!(listening(tcp_port), "the others stay");
    // emberd dies hard and comes back: the pod VM lived on, and its ports
    // are forwarded again once emberd has reconnected to its agent.
    d.kill9();
    assert!(!listening(tcp_port), "the forwarder died with emberd");
    d.restart();
    let back = wait_for(PATIENCE, || listening(tcp_port).then_some(()));
    assert!(back.is_some(), "forwarded again after the restart");
    let h = Hyperctl::new(&d.sock);

    // A bridge that does not exist fails the start clearly.
    let bridged = json!({"id": "bridged", "containers": [{"name": "app", "image": "busybox"}],
                         "interfaces": [{"bridge": "embnosuchbr0"}]});
    let p2 = env_ok(
        &h.call_json("POST", "/pod/create", &bridged.to_string()),
        201,
    );
    let r = h.call("POST", &format!("/pod/start?podId={p2}"));
    assert_eq!(r.status, 404, "{}", body(&r));
    assert!(body(&r).contains("bridge embnosuchbr0"), "{}", body(&r));
    // Refused at create: what the guest could not apply.
    let r = h.call_json(
        "POST",
        "/pod/create",
        r#"{"id":"bad","containers":[{"image":"busybox"}],"interfaces":[{"ifname":"wlan0"}]}"#,
    );
    assert_eq!(r.status, 400, "{}", body(&r));

    env_ok(
        &h.call("POST", &format!("/pod/stop?podId={pod}&stopVm=yes")),
        200,
    );
    assert!(!listening(tcp_port), "a stopped pod forwards nothing");
    for t in &taps {
        let gone = wait_for(PATIENCE, || (!link(t).status.success()).then_some(()));
        assert!(gone.is_some(), "TAP {t} is removed with the VM");
    }
    for p in [&pod, &p2] {
        env_ok(&h.call("DELETE", &format!("/pod?podId={p}")), 200);
    }
}
