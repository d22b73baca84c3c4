//! ember's freestanding test guest, built from `guest/` by `build.rs` with gcc.
//!
//! Three images of the same program are produced (see docs/boot-layout.md):
//! [`LINUX64_ELF`] (64-bit Linux boot protocol), [`PVH_ELF`] (PVH 32-bit
//! entry) and [`BZIMAGE`] (bzImage with a real setup header). They are also
//! copied to `<target dir>/guests/`.
//!
//! The guest prints lines starting with `ember-guest: ` on COM1 and selects a
//! test mode with `ember.test=<mode>` on the command line (default `hello`).
//!
//! # virtio modes
//!
//! The guest finds virtio-mmio (version 2) devices through
//! `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` words on its command line
//! (size like `4K`, `0x1000` or `4096`; base in hex with `0x`), drives them
//! by polling (split virtqueues, `VIRTIO_F_VERSION_1`, no interrupts) and
//! uses the first device of the needed type. Every mode ends with
//! `ember-guest: done` and a reset. Timeouts come from the PIT, so they are
//! real time whatever the CPU speed. In the lines below, `<hex>` is
//! lower-case hex without leading zeros, `<fnv>` is an FNV-1a 32 hash printed
//! as `0x` + 8 hex digits.
//!
//! When the device a mode needs is not announced: `ember-guest: blk none`,
//! `net none`, `vsock none` or `evil no block device`. When its
//! initialisation fails: `<blk|net|vsock> init failed at
//! <features|queues|driver-ok> status 0x<hex>`.
//!
//! ## `virtio-probe`
//! - `ember-guest: virtio none` (no device announced), else per device in
//!   cmdline order: `ember-guest: virtio 0x<base hex> irq <n> id <device id>
//!   version <v>`, `ember-guest: virtio 0x<base> absent` (DeviceID 0) or
//!   `ember-guest: virtio 0x<base> bad-magic 0x<value>`.
//!
//! ## `blk` (options: `ember.blk_write=1`)
//! 1. `blk capacity <sectors> ro <0|1>`
//! 2. `blk id <GET_ID string, up to 20 chars, non-printables as ?>`
//! 3. `blk read fnv1a <fnv>`: sectors 0..min(8, capacity) (4 KiB normally)
//! 4. `blk last-sector fnv1a <fnv>`: sector capacity-1 (512 bytes)
//! 5. `blk beyond-end status <s>`: a read of sector `capacity`
//! 6. only with `ember.blk_write=1`: writes 4 KiB at sector 8 (byte i =
//!    (i*13 + 7) & 0xff); writable: `blk flush status <s>` (if FLUSH is
//!    offered), then `blk write ok` | `blk write mismatch at <offset>` |
//!    `blk write status <s>` | `blk write skipped capacity <n>` (< 16
//!    sectors); read-only: `blk write status <s>` (1 = IOERR expected).
//!
//! In the status lines `<s>` is the status byte in decimal, `none` (used
//! element without status, used length 0) or `timeout` (5 s); a failed step
//! 3/4 prints `blk read status <s>` / `blk last-sector status <s>`.
//!
//! ## `bench-blk`
//! 256 reads of 4 KiB (1 MiB), then `bench blk bytes 1048576`.
//!
//! ## `net` (options: `ember.ip=<a.b.c.d>` default 10.0.0.2,
//! `ember.peer=<a.b.c.d>` default 10.0.0.1)
//! 1. `net mac aa:bb:cc:dd:ee:ff` (config MAC) or `net mac none` (then
//!    02:00:00:00:00:02 is used)
//! 2. ARP request for the peer (5 tries, 1 s each): `net arp <peer mac>`
//! 3. for n = 1..3: UDP `ember-ping <n>` from port 4000 to peer port 7 (5
//!    tries, 1 s each), echo matched: `net udp-echo ok <n>`
//!
//! ARP requests for the guest's IP are answered meanwhile. Failures:
//! `net timeout waiting for arp reply`, `net timeout waiting for udp-echo
//! <n>`, `net timeout waiting for tx completion`, `net bad ember.ip <v>`.
//!
//! ## `bench-net`
//! After ARP as above, 256 UDP datagrams of 1024 bytes to peer port 9:
//! `bench net bytes 262144`.
//!
//! ## `vsock` (options: `ember.vsock_mode=guest|host|both` default both,
//! `ember.vsock_port=<p>` default 52, `ember.vsock_listen=<p>` default 1234)
//! 1. `vsock cid <guest cid>`
//! 2. guest-initiated (guest/both): from guest port 49152 to host CID 2 port
//!    `vsock_port`: `vsock guest-connect connected`, sends
//!    `hello from guest\n`, then `vsock guest-connect echo ok` (or `... echo
//!    mismatch got <n> bytes`, `vsock timeout waiting for guest-connect
//!    echo`), full SHUTDOWN, waits up to 2 s for RST (sends RST itself
//!    otherwise), `vsock guest-connect closed`. Refused: `vsock
//!    guest-connect refused op <op>`; no answer in 5 s: `vsock timeout
//!    waiting for guest-connect response`.
//! 3. host-initiated (host/both): `vsock listening on port <p>` (a host
//!    test must connect only after this line: earlier requests are refused
//!    with RST while the guest-initiated part runs), then on
//!    OP_REQUEST to that port: `vsock host-connect accepted`; every OP_RW
//!    payload is echoed; on OP_SHUTDOWN it answers RST (on RST it just
//!    stops) and prints `vsock host-connect echoed <bytes>`. No request in
//!    60 s: `vsock timeout waiting for host-connect`; no packet for 10 s
//!    while connected: `vsock timeout waiting for host-connect data` (then
//!    RST and the echoed line).
//!
//! In both vsock modes (`vsock`, `pod-agent`) the guest advertises
//! buf_alloc 65536 and counts consumed bytes in fwd_cnt (credit update
//! after 32 KiB), answers CREDIT_REQUEST, and sends within the host's
//! credit. Packets for unknown connections get an RST. A
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue (a VMM restored
//! from a snapshot sends it) drops the open connection and rereads the
//! guest CID.
//!
//! ## `snap-io` (options: `ember.ip`, `ember.peer` as for `net`,
//! `ember.vsock_port=<p>` default 52)
//! Sets up the first block, net and vsock devices together (a missing one
//! reports `none`), prints `snap-io ready`, then loops forever, every
//! 100 ms: writes `ember-snap-io round <n>\n` (zero-padded) to sector 1,
//! flushes and reads it back; rereads the MAC, ARPs for the peer and
//! exchanges one UDP echo (`snap-io <n>`) on port 7; connects over vsock to
//! host CID 2 port `<p>`, sends `snap-io <n>\n`, reads it back and shuts
//! down; then prints
//! `round <n> blk <r> net <r> vsock <r> mac <mac> cid <cid> resets <k>`
//! with each `<r>` `ok`, `fail` or `none` and `<k>` the transport resets
//! seen. Made for snapshots: a restored guest keeps counting, and shows a
//! new MAC, CID or disk as soon as the next round.
//!
//! ## `pod-agent` (options: `ember.vsock_listen=<p>` default 2718)
//! Plays the in-guest agent's wire protocol (`agent/src/protocol.rs`) over
//! real virtio-vsock, so that the host side of a pod VM (emberd, ember-vmm
//! and its hybrid vsock socket, the agent client) is tested here. It is not
//! the agent: containers are only records, and the real ember-agent (the
//! `agent/` crate) is tested on the host and needs a Linux guest.
//! 1. `pod-agent initrd size <n> head-fnv1a <fnv>` (size in decimal; the
//!    hash covers the first min(n, 4096) bytes only, since a pod initramfs
//!    is megabytes and hashing it in emulated ring 0 takes tens of seconds)
//!    or `pod-agent initrd none`
//! 2. `pod-agent disks <n>`: the virtio-blk devices on the cmdline
//! 3. `pod-agent listening on port <p>`; one host connection at a time
//!    (other requests get an RST): `pod-agent connection accepted`, then
//!    READY (cmd 8) `{"version":"pod-agent-guest","pid1":true}` is sent.
//! 4. per frame received: `pod-agent recv cmd <n> len <len>` and `pod-agent
//!    payload <first 400 bytes, non-printables as ?>`, then the reply.
//! 5. when the host closes (SHUTDOWN, answered with RST, or RST): `pod-agent
//!    connection closed` and back to 3; the containers are kept. There is no
//!    timeout: the mode runs until DESTROYPOD.
//!
//! Frames are `cmd: u32 BE | length: u32 BE | length bytes of JSON`, in any
//! split over vsock packets. A length over 8192 gets only the recv line,
//! ERROR `frame payload of <len> bytes exceeds the 8192-byte limit` and an
//! RST (then 5). Replies: ACK (9), ERROR (10) `{"message":"<m>"}`; exit
//! events (23) are `{"event":"exited","id":"<id>","code":<c>}`. Ids and
//! paths are JSON strings without escapes; ids are `[A-Za-z0-9_.-]`, 1-64
//! chars (else `bad <CMD> payload: no valid id`); an unknown id gives `no
//! such container <id>`.
//! - PING (12): ACK `{"version":"pod-agent-guest"}`.
//! - NEWCONTAINER (17), rootfs path `/dev/vd<letter>` = the (letter -
//!   'a')-th virtio-blk device in cmdline order, whose bytes 1024..2047 (the
//!   superblock) must hold the ext4 magic 0xef53 (u16 LE) at offset 56:
//!   `pod-agent container <id> rootfs <path> ext4 ok`, ACK `{"pid":<100 +
//!   slot>}` (8 slots, the lowest free one). Errors: `no such device
//!   <path>`, `<path> is not ext4`, `cannot read <path>: status <s>`,
//!   `container <id> exists` (running or exited: until removed), `too many
//!   containers (8)`, `bad NEWCONTAINER payload: no valid rootfs path`. With
//!   the env pair `["EMBER_STUB_EXIT","<0-255>"]` the container exits at
//!   once: its exit event follows the ACK.
//!   With `"stdio":true` and `cmd[0]` `stub-echo` (`cmd[1]` an optional
//!   exit code, default 0), output events (23)
//!   `{"event":"output","id":"<id>","stream":<1|2>,"data":"<base64>","seq":<n>}`
//!   (`seq` counts each process's output events from 1)
//!   follow the ACK: `stub-echo <id> ready\n` (stream 1), `stub-echo <id>
//!   stderr\n` (stream 2).
//! - EXECCMD (6), `container` a container's id, `cmd[0]` `stub-echo` (as
//!   above) or `stub-exit` [code]: `pod-agent exec <id> in <container>:
//!   <cmd0>`, ACK `{"id":"<id>","pid":<100 + slot>}` (execs share the 8
//!   slots); with `"stdio":true`, `stub-exit` then sends `stub-exit <id>\n`
//!   (1), `bye\n` (2) and its exit event. Errors: `no such container:
//!   <c>`, `conflict: id <id> is already in use`, `starting <id>: execve
//!   failed: the pod-agent guest runs only stub-echo and stub-exit`.
//! - STDIN (66) `{"id","data","eof"}` to a running `stub-echo`: `data`
//!   (base64) comes back as is in a stream-1 output event; with `eof`
//!   `pod-agent stdin of <id> closed` and its exit event (the code of
//!   `cmd[1]`); then ACK `{}`. Else ERROR `bad parameter: the stdin of <id>
//!   is closed` (or `no such process: <id>`).
//! - RESIZE (67) `{"id","rows","cols"}`: `pod-agent resize <id>
//!   <rows>x<cols>`, ACK `{}`.
//! - LOGS (68) `{"id"}`: ACK `{"id":"<id>","records":[{"seq","stream",
//!   "time_ns":0,"data"}...]}`, the last 8 output events of the process
//!   whose base64 is at most 768 bytes, oldest first.
//! - KILLCONTAINER (18), `signal` 1..64 (default 15): a running container
//!   (and each running exec in it, first) exits with code 128 + signal: its
//!   exit event, then ACK `{"id":"<id>","code":<c>}`; an exited one: the
//!   ACK with its code only.
//! - WAITPROCESS (64): exited: ACK `{"id":"<id>","code":<c>}`; running:
//!   ERROR `pod-agent guest cannot wait for a running process`.
//! - REMOVECONTAINER (22): forgets the container (running or not) and its
//!   execs, ACK `{}`.
//! - DESTROYPOD (4): ACK `{}`, `pod-agent destroy`, a full SHUTDOWN (the
//!   host answers RST once the ACK is written to its socket; the guest
//!   sends RST after 2 s otherwise), then `done` and the reset.
//! - anything else: ERROR `unsupported command <n>`.
//!
//! ## Evil modes (first block device)
//! Each prints `evil <name> sent` after the attack and then, after polling
//! the used ring for up to 1 s, `evil <name> used-len <len|none> status
//! <status byte|none>`. Then `evil device status 0x<hex>` (Status register
//! after the attack), a reset + re-initialisation + 4 KiB read of sector 0:
//! `evil recovered fnv1a <fnv>` (same hash as `blk read fnv1a`), or
//! `evil recover failed` / `evil recover read status <s>`.
//! - `evil-desc-oob`: names `desc-oob` (data descriptor at 0xfff00000, 4096
//!   bytes) and `desc-wrap` (0xfffffffffffff000 + 0x2000 wraps).
//! - `evil-desc-loop`: name `desc-loop` (descriptors 0 -> 1 -> 2 -> 0).
//! - `evil-len`: name `len` (data descriptor length 0xffffffff).
//! - `evil-avail-idx`: name `avail-idx` (avail idx = 1000 with queue size 16).
//! - `evil-queue-size`: twice (QueueNum 3, then QueueNumMax*2): `evil
//!   queue-num <n>` and `evil status 0x<Status after DRIVER_OK> ready
//!   <QueueReady read-back>`; then uses the queue anyway: name
//!   `queue-size`.
//!
//! A host test should assert: the VMM is still running/exits 0 and the
//! guest printed `ember-guest: done`.
//!
//! ## `evil-vsock-flood` (options: `ember.vsock_port=<p>` default 52,
//! `ember.flood_conns=<n>` default 300, at most 512,
//! `ember.flood_chunks=<k>` default 0, `ember.flood_hold=0|1` default 1)
//! A connection flood toward host port `p` (the test's `<uds>_<p>`
//! listener), lying about its credit: every packet claims buf_alloc
//! 0xffffffff. It sends `n` REQUESTs from guest ports 20000.. without
//! waiting for answers, then `k` rounds of one 65536-byte OP_RW on each
//! connection that got a RESPONSE, ignoring the host's credit (a host peer
//! that never reads makes the VMM buffer up to its limits, then reset).
//! Lines: `evil vsock-flood start conns <n> chunks <k> port <p>`, then
//! `evil vsock-flood requests <n> responses <r> refused <f> resets <x>`
//! (RSTs before / after a RESPONSE; counts depend on timing), then with
//! hold `evil vsock-flood holding` and the guest halts, keeping its
//! connections (the test ends the VMM); without, `done` and a reset.
//!
//! ## `evil-net-flood` (options: `ember.flood_frames=<n>` default 4096,
//! `ember.flood_hold=0|1` default 1)
//! Both queues set up with 256 entries; the rx queue never gets a buffer.
//! The tx ring is kept full (128 chains of two descriptors, each slot
//! republished as soon as it comes back used) until `n` chains were sent,
//! in four kinds by slot: a maximum-size frame (12-byte zero vnet header +
//! 65550 bytes to ff:ff:ff:ff:ff:ff) in one descriptor, the same split
//! header/body, one byte over that size, and a 4-byte runt followed by a
//! device-writable body. Lines: `evil net-flood start frames <n>`, then
//! `evil net-flood frames <sent> completed <used>` (or first `evil
//! net-flood stalled after <used> of <sent>` when nothing comes back for
//! 60 s), then with hold `evil net-flood holding` and the guest halts.
//!
//! ## `evil-blk-flood` (options: `ember.flood_rounds=<r>` default 2,
//! `ember.flood_hold=0|1` default 1; needs RAM at 16 MiB..17 MiB)
//! The request queue set up with 256 entries; each entry an indirect
//! table (VIRTIO_RING_F_INDIRECT_DESC is not negotiated: the device takes
//! them anyway) of header, `seg_max` segments of `size_max` bytes (from the
//! config space when offered, else 128 and 64 KiB; at most 254 and 64 KiB)
//! all over one 64 KiB buffer, and a status byte; even entries read, odd
//! ones write, at sector `(i % (capacity / per-request sectors)) *
//! per-request sectors`. Each round publishes all 256 and waits (60 s) for
//! all of them. Lines: `evil blk-flood start rounds <r> size_max <s>
//! seg_max <g> capacity <sectors>`, `evil blk-flood requests <256 r>
//! completed <c> ok <k> ioerr <e> other <o>`, then two requests just over
//! the limits, a read of `seg_max + 1` 512-byte segments and a write of one
//! `seg_max * size_max + 512`-byte segment: `evil blk-flood oversize status
//! <a> <b>` (status bytes; -1 when not answered), then with hold `evil
//! blk-flood holding` and the guest halts.

/// ELF64 image without a PVH note; entered in long mode with RSI = zero page.
pub const LINUX64_ELF: &str = concat!(env!("OUT_DIR"), "/ember-guest-linux64.elf");
/// ELF64 image with a `XEN_ELFNOTE_PHYS32_ENTRY` note (PVH boot).
pub const PVH_ELF: &str = concat!(env!("OUT_DIR"), "/ember-guest-pvh.elf");
/// bzImage: setup sectors + flat protected-mode image (startup_64 at +0x200).
pub const BZIMAGE: &str = concat!(env!("OUT_DIR"), "/ember-guest.bzImage");

/// Prefix of every line the guest prints.
pub const LINE_PREFIX: &str = "ember-guest: ";
/// Line printed when a finishing test mode is done (followed by a reset).
pub const DONE_LINE: &str = "ember-guest: done";

/// Test modes understood by the guest (`ember.test=<mode>`).
pub const MODES: &[&str] = &[
    "hello",
    "cmdline",
    "memmap",
    "cpus",
    "initrd",
    "idle",
    "ticker",
    "mempattern",
    "mempattern-rng",
    "wait-ctrlaltdel",
    "triple-fault",
    "virtio-probe",
    "blk",
    "net",
    "vsock",
    "pod-agent",
    "evil-desc-oob",
    "evil-desc-loop",
    "evil-len",
    "evil-queue-size",
    "evil-avail-idx",
    "evil-vsock-flood",
    "evil-net-flood",
    "evil-blk-flood",
    "bench-blk",
    "bench-net",
];

/// `mempattern` prints `ember-guest: mempattern <round> bad <count>` each
/// round; `bad` counts the words of its memory that did not hold what it
/// wrote (0 unless a snapshot restore gave it wrong memory).
pub const MEMPATTERN_PREFIX: &str = "ember-guest: mempattern ";

/// Output line of `virtio-probe` when no device is announced.
pub const VIRTIO_NONE_LINE: &str = "ember-guest: virtio none";

/// `virtio-probe` line for a present device.
pub fn virtio_probe_line(base: u64, irq: u32, device_id: u32, version: u32) -> String {
    format!("ember-guest: virtio {base:#x} irq {irq} id {device_id} version {version}")
}

/// The cmdline word announcing a virtio-mmio device (as ember-vmm writes it).
pub fn virtio_mmio_cmdline(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// FNV-1a (32-bit) as the guest computes it for `... fnv1a 0x<hash>` lines.
pub fn fnv1a32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The 4 KiB pattern the `blk` mode writes at sector 8 (`ember.blk_write=1`).
pub fn blk_write_pattern() -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i.wrapping_mul(13).wrapping_add(7) & 0xff) as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader, PvhBootCapability};
    use std::fs::File;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const HIMEM: GuestAddress = GuestAddress(0x10_0000);

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn c_helpers_pass_their_host_tests() {
        let out = std::process::Command::new(env!("EMBER_GUEST_HOST_TEST"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "host-test failed:\n{stdout}\n{stderr}"
        );
        assert!(stdout.starts_with("ok "), "{stdout}");
    }

    #[test]
    fn helper_lines_and_hash() {
        assert_eq!(
            virtio_mmio_cmdline(0xd000_1000, 6),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(
            virtio_probe_line(0xd000_0000, 5, 2, 2),
            "ember-guest: virtio 0xd0000000 irq 5 id 2 version 2"
        );
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
        let p = blk_write_pattern();
        assert_eq!((p[0], p[1], p[20], p.len()), (7, 20, 11, 4096));
    }

    #[test]
    fn linux64_elf_loads_without_pvh_note() {
        let mut f = File::open(LINUX64_ELF).unwrap();
        let r = Elf::load(&mem(), None, &mut f, Some(HIMEM)).unwrap();
        // No PT_NOTE at all: linux-loader leaves its default (not "present").
        assert!(!matches!(
            r.pvh_boot_cap,
            PvhBootCapability::PvhEntryPresent(_)
        ));
        assert!(
            r.kernel_load.0 > 0x10_0200,
            "ELF entry is elf_start64 in .text"
        );
        // Loaded at 1 MiB; the balloon mode's 1 MiB of pages (.bss) is the
        // largest part of it.
        assert!(r.kernel_end > 0x10_0000 && r.kernel_end < 0x40_0000);
    }

    #[test]
    fn pvh_elf_has_phys32_entry() {
        let mut f = File::open(PVH_ELF).unwrap();
        let r = Elf::load(&mem(), None, &mut f, Some(HIMEM)).unwrap();
        match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => {
                assert!(a.0 > 0x10_0200 && a.0 < r.kernel_end, "entry {a:?}")
            }
            other => panic!("no PVH entry: {other:?}"),
        }
    }

    #[test]
    fn bzimage_loads_with_linux_loader() {
        let gm = mem();
        let mut f = File::open(BZIMAGE).unwrap();
        let r = BzImage::load(&gm, None, &mut f, Some(HIMEM)).unwrap();
        assert_eq!(r.kernel_load, HIMEM);
        let hdr = r.setup_header.unwrap();
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert!({ hdr.version } >= 0x020c);
        assert_eq!({ hdr.loadflags } & 1, 1);
        assert_eq!({ hdr.xloadflags } & 1, 1);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.cmdline_size }, 4095);
        let len = std::fs::metadata(BZIMAGE).unwrap().len();
        let setup = (u64::from(hdr.setup_sects) + 1) * 512;
        assert_eq!(u64::from(hdr.syssize) * 16, len - setup);
        assert!(u64::from(hdr.init_size) >= len - setup);
        assert_eq!(r.kernel_end, 0x10_0000 + len - setup);
    }

    #[test]
    fn bzimage_startup_64_matches_elf_layout() {
        // The protected-mode part is the flat image of the linux64 ELF, so
        // offset 0x200 must hold the startup_64 code (mov $2, %edi; jmp).
        let bz = std::fs::read(BZIMAGE).unwrap();
        let setup = (usize::from(bz[0x1f1]) + 1) * 512;
        assert_eq!(&bz[setup + 0x200..setup + 0x205], &[0xbf, 2, 0, 0, 0]);
    }
}
